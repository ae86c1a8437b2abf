"""`forgec plan`: plans at scale under a fake process group — per-rank shards read
off real FSDP2 DTensors, pipeline stages, and a memory estimate checked against
the peak measured on this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli

from runtime.planner import (
    _destroy,
    _init_fake,
    chunk_rows,
    in_flight,
    plan_report,
    saved_bytes_per_unit,
)

DEBUG = str(ROOT / "specs" / "llama_debug.forge")

MID = """
model mid {
  vocab_size  = 256
  dim         = 256
  n_layers    = 4
  n_heads     = 4
  max_seq_len = 256

  token_embedding = embedding(vocab_size, dim)
  rope            = rope(head_dim = dim / n_heads, max_seq_len = max_seq_len)

  block dense(x) {
    attention_norm = rmsnorm(dim)
    attention      = attention(dim, heads = n_heads, rope = rope)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 768)

    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }

  layers      = stack(n_layers) { default: dense }
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, vocab_size)
}

plan single for mid {
  mesh(dp = 1)
}

plan fsdp3 for mid {          # 3 does not divide 256: uneven shards
  mesh(dp = 3)
  fsdp()
}
"""


def run(*args: str) -> tuple[int, str, str]:
    proc = cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mid")
    (folder / "mid.forge").write_text(MID)
    return folder


def test_70b_on_512_ranks(tmp_path):
    code, out, err = run("plan", str(ROOT / "specs" / "llama3_70b.forge"), "--plan",
                            "dp64_pp8", "--world", "512", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["world"] == 512 and r["mesh"]["dp"] == 64 and r["mesh"]["pp"] == 8
    ranks = r["per_rank"]
    assert [row["rank"] for row in ranks] == list(range(512))
    # FSDP stores every parameter exactly once over the dp ranks of its stage
    assert r["params_total"] == r["params_stored"] == 70_553_706_496
    assert sum(row["params"] for row in ranks) == 70_553_706_496
    stage_params = r["pipeline"]["stage_params"]
    assert len(stage_params) == 16 and sum(stage_params) == 70_553_706_496
    # interleaved: pipeline rank p runs stages p and p + 8; its 64 dp ranks split them
    for p in range(8):
        rows = ranks[64 * p: 64 * (p + 1)]
        assert {tuple(row["stages"]) for row in rows} == {(p, p + 8)}
        assert sum(row["params"] for row in rows) == stage_params[p] + stage_params[p + 8]
    # a decoder layer is 4·8192² (q, o) + 2·8192·1024 (k, v) + 3·8192·28672 (MLP) + 2·8192
    # (norms) = 855,654,400 parameters; pipeline rank 1 holds 10 of them (two stages of 5)
    assert ranks[64]["params"] == 10 * 855_654_400 // 64
    row = ranks[0]
    assert row["param_bytes"] == row["grad_bytes"] == 4 * row["params"]
    assert row["optimizer_bytes"] == 8 * row["params"]
    assert r["compute_dtype"] == "bf16"
    # only the last pipeline rank holds the output head's logits
    assert [row["logits_bytes"] > 0 for row in ranks[::64]] == [False] * 7 + [True]
    assert r["pipeline"]["flops_balance"] >= 1.0


def test_pipeline_ranks_hold_their_stages():
    r = plan_report(DEBUG, "pp2", 2)
    stage_params = r["pipeline"]["stage_params"]
    assert [row["params"] for row in r["per_rank"]] == stage_params
    assert [row["gathered_bytes"] for row in r["per_rank"]] == [0, 0]  # no FSDP
    r = plan_report(DEBUG, "fsdp2_pp2", 4)
    assert [(row["pp_rank"], row["dp_rank"]) for row in r["per_rank"]] == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    assert r["per_rank"][0]["params"] + r["per_rank"][1]["params"] == stage_params[0]


def test_uneven_shards_follow_fsdp2(mid):
    """chunk_rows (used for every dp rank) against the DTensors fully_shard makes
    at each rank of a fake 3-rank group."""
    import importlib

    from torch.distributed.device_mesh import init_device_mesh

    from compiler.build import build
    from compiler.driver import compile_spec
    from runtime.package import import_package

    pkg = import_package(build(compile_spec(str(mid / "mid.forge")), str(mid / "pkg"),
                               update=True).package)
    plan = importlib.import_module(f"{pkg.__name__}.plan")
    for rank in range(3):
        _init_fake(rank, 3)
        try:
            with torch.device("meta"):
                model = pkg.Transformer()
            plan.apply_fsdp(model, init_device_mesh("cpu", (3,)), "fsdp3")
            for fqn, p in model.named_parameters():
                assert p.to_local().shape[0] == chunk_rows(p.shape[0], 3, rank), (fqn, rank)
        finally:
            _destroy()
    r = plan_report(str(mid / "mid.forge"), "fsdp3", 3)
    per = [row["params"] for row in r["per_rank"]]
    assert sum(per) == r["params_total"] and per[0] > per[2]  # the last chunks are shorter


def test_chunk_rows():
    assert [chunk_rows(10, 4, i) for i in range(4)] == [3, 3, 3, 1]
    assert [chunk_rows(2, 4, i) for i in range(4)] == [1, 1, 0, 0]
    assert [chunk_rows(8, 4, i) for i in range(4)] == [2, 2, 2, 2]


def test_in_flight_microbatches():
    assert in_flight(None, 1, 1, 0, 1) == 1
    assert in_flight("gpipe", 4, 2, 1, 1) == 4
    assert [in_flight("1f1b", 8, 4, r, 1) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight("interleaved_1f1b", 16, 8, r, 2) for r in (0, 7)] == [23, 9]
    assert in_flight("interleaved_1f1b", 2, 2, 0, 2) == 4  # capped by the work there is


def test_saved_activations_match_a_real_forward(mid):
    """The meta-device measurement against autograd's saved tensors on CPU."""
    from compiler.build import build
    from compiler.driver import compile_spec
    from runtime.package import import_package

    pkg = import_package(build(compile_spec(str(mid / "mid.forge")), str(mid / "pkg2"),
                               update=True).package)
    measured = saved_bytes_per_unit(pkg, 2, 64, torch.float32)
    model = pkg.Transformer()
    params = {id(p) for p in model.parameters()}
    seen = {}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in params:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    tokens = torch.randint(0, 256, (2, 65))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    assert sum(measured.values()) == sum(seen.values())
    assert set(measured) == {"token_embedding", *(f"layers.{i}" for i in range(4)), "norm",
                             "output_head"}


@pytest.mark.parametrize("batch, seq", [(2, 64), (8, 256)])
def test_memory_estimate_within_15_percent_of_the_measured_peak(mid, batch, seq):
    code, out, err = run("plan", str(mid / "mid.forge"), "--plan", "single", "--world", "1",
                            "--micro-batch", str(batch), "--seq-len", str(seq), "--json")
    assert code == 0, err
    estimate = json.loads(out)["per_rank"][0]["total_bytes"]
    code, _, err = run("build", "-o", str(mid / "built"), str(mid / "mid.forge"))
    assert code == 0, err
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"),
                           str(mid / "built" / "mid"), str(batch), str(seq)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)["delta"]
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, proc.stdout)


def test_errors(mid):
    code, _, err = run("plan", DEBUG, "--plan", "fsdp2", "--world", "3")
    assert code == 1
    assert "llama_debug.forge:" in err and "error[E120]: plan 'fsdp2' needs 2 ranks" in err
    code, _, err = run("plan", DEBUG, "--plan", "fsdp9", "--world", "2")
    assert code == 2 and "no plan 'fsdp9'" in err and "fsdp2" in err
    code, _, err = run("plan", DEBUG, "--plan", "fsdp2", "--world", "2", "--seq-len", "999")
    assert code == 2 and "exceeds the model's max_seq_len 256" in err
    code, _, err = run("plan", str(ROOT / "specs" / "vlm.forge"), "--plan", "fsdp2_vlm",
                          "--world", "2")
    assert code == 1 and "text models' plans only" in err
    code, _, err = run("plan", str(mid / "nope.forge"), "--plan", "x", "--world", "1")
    assert code == 2 and "no such file" in err
    assert "Traceback" not in err


def test_text_report():
    code, out, err = run("plan", DEBUG, "--plan", "fsdp2_pp2", "--world", "4")
    assert code == 0, err
    assert out.startswith("plan fsdp2_pp2 for llama_debug: 4 ranks (dp 2 × pp 2)")
    assert "pipeline 1f1b, 2 microbatches, 2 stages" in out
    assert "peak: rank " in out
