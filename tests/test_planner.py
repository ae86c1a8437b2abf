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

from forgec.runtime.parallel import apply_fsdp, build_stage
from forgec.runtime.planner import (
    _destroy,
    _init_fake,
    chunk_rows,
    in_flight,
    plan_report,
    saved_bytes_per_unit,
)

DEBUG = str(ROOT / "specs" / "llama_debug.forge")
VLM = str(ROOT / "specs" / "vlm.forge")

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

plan full_ckpt for mid {
  activation_checkpoint(default = full)
}

plan sac for mid {            # op-level selective: matmul and attention outputs kept
  activation_checkpoint(default = selective(save = [matmul, sdpa]))
}

plan sac_every_2 for mid {
  activation_checkpoint(default = selective(every = 2, save = [sdpa]))
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
    # only the last pipeline rank holds the output head's logits: of the fused loss's
    # 2**24 fp32 logits at a time, 130 rows of 128,256 (not the micro-batch's 8,192)
    assert [row["logits_bytes"] for row in ranks[::64]] == [0] * 7 + [130 * 128_256 * 4]
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


def test_tensor_parallel_ranks():
    """tp2 splits q/k/v, o, gate/up and down between the two tp ranks and keeps
    the embedding, norms and head whole on both; dp2_tp2 then shards each tp
    rank's part over dp. Ranks are (pp * dp + dp) * tp + tp, as the trainer's
    mesh orders them. (Each rank's `params` against a real run's shards, and
    its memory against a measured peak: tests/test_planner_ranks.py.)"""
    tp2 = plan_report(DEBUG, "tp2", 2)
    with torch.device("meta"):
        model = generated_package("llama_debug").Transformer()
    whole = sum(p.numel() for n, p in model.named_parameters()
                if not n.startswith("layers.") or "norm" in n)
    split = sum(p.numel() for p in model.parameters()) - whole
    assert [row["params"] for row in tp2["per_rank"]] == [split // 2 + whole] * 2
    assert tp2["params_stored"] == tp2["params_total"] + whole
    r = plan_report(DEBUG, "dp2_tp2", 4)
    assert [(row["rank"], row["dp_rank"], row["tp_rank"]) for row in r["per_rank"]] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    for tp_rank in range(2):  # FSDP shards each tp rank's part over dp
        assert sum(row["params"] for row in r["per_rank"] if row["tp_rank"] == tp_rank) == \
            tp2["per_rank"][tp_rank]["params"]
    # a tp rank runs half the heads and hidden features: less saved for backward
    assert r["per_rank"][0]["activation_bytes"] < plan_report(DEBUG, "fsdp2", 2)[
        "per_rank"][0]["activation_bytes"]


def test_tied_head_copy_is_stored_on_the_last_stage():
    """qwen_debug's head shares the embedding table; under pp2 the last stage
    holds a copy of it (the runtime keeps it equal), which its rank stores."""
    r = plan_report(str(ROOT / "specs" / "qwen_debug.forge"), "pp2", 2)
    stage_params = r["pipeline"]["stage_params"]  # the model's own parameters, once
    assert sum(stage_params) == r["params_total"] == 481_120
    table = 256 * 96
    assert [row["params"] for row in r["per_rank"]] == [stage_params[0],
                                                        stage_params[1] + table]
    assert r["params_stored"] == r["params_total"] + table


def test_uneven_shards_follow_fsdp2(mid):
    """chunk_rows (used for every dp rank) against the DTensors fully_shard makes
    at each rank of a fake 3-rank group."""
    import importlib

    from torch.distributed.device_mesh import init_device_mesh

    from forgec.compiler.build import build
    from forgec.compiler.driver import compile_spec
    from forgec.runtime.package import import_package

    pkg = import_package(build(compile_spec(str(mid / "mid.forge")), str(mid / "pkg"),
                               update=True).package)
    plan = importlib.import_module(f"{pkg.__name__}.plan")
    for rank in range(3):
        _init_fake(rank, 3)
        try:
            with torch.device("meta"):
                model = pkg.Transformer()
            apply_fsdp(model, init_device_mesh("cpu", (3,)), plan, "fsdp3")
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


def saved_on_cpu(model, targets, *args, **kwargs) -> int:
    """Bytes autograd saves in a real forward of `model` and its fused
    cross-entropy (model(..., targets=...), as the trainers call it),
    parameters left out."""
    params = {id(p) for p in model.parameters()}
    seen = {}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in params:
            seen[id(base)] = base  # kept alive: a freed tensor's id may be reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, targets=targets, **kwargs)
    return sum(t.numel() * t.element_size() for t in seen.values())


def test_saved_activations_match_a_real_forward(mid):
    """The meta-device measurement against autograd's saved tensors on CPU."""
    from forgec.compiler.build import build
    from forgec.compiler.driver import compile_spec
    from forgec.runtime.package import import_package

    pkg = import_package(build(compile_spec(str(mid / "mid.forge")), str(mid / "pkg2"),
                               update=True).package)
    measured = saved_bytes_per_unit(pkg, 2, 64, torch.float32)
    model = pkg.Transformer()
    tokens = torch.randint(0, 256, (2, 65))
    doc_ids = torch.zeros(2, 64, dtype=torch.long)  # packed documents, as the trainers feed
    saved = saved_on_cpu(model, tokens[:, 1:], tokens[:, :-1], doc_ids=doc_ids)
    assert sum(measured.values()) == saved
    assert set(measured) == {"token_embedding", *(f"layers.{i}" for i in range(4)), "norm",
                             "output_head"}


# Full checkpointing (plan full_ckpt) is not among them yet: its estimate, 107.7 MB at
# 8 x 256, is 10-19 % below the peaks measured on two machines (119.9, 133.3 MB), so a
# 15 % test of it fails on some; what the estimate leaves out of the recompute is open.
@pytest.mark.parametrize("batch, seq, plan", [(2, 64, "single"), (8, 256, "single"),
                                              (8, 256, "sac")])
def test_memory_estimate_within_15_percent_of_the_measured_peak(mid, batch, seq, plan):
    """The estimate against the peak of real training steps, the activation
    checkpointing of the plan applied (runtime.parallel), selective included."""
    code, out, err = run("plan", str(mid / "mid.forge"), "--plan", plan, "--world", "1",
                            "--micro-batch", str(batch), "--seq-len", str(seq), "--json")
    assert code == 0, err
    estimate = json.loads(out)["per_rank"][0]["total_bytes"]
    code, _, err = run("build", "-o", str(mid / "built"), str(mid / "mid.forge"))
    assert code == 0, err
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"),
                           str(mid / "built" / "mid"), str(batch), str(seq),
                           *([plan] if plan != "single" else [])],
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
    code, _, err = run("plan", VLM, "--plan", "fsdp2_vlm", "--world", "2", "--seq-len", "129")
    assert code == 2 and "--seq-len 129 exceeds the vlm's max_text 128" in err
    code, _, err = run("plan", VLM, "--plan", "fsdp2_vlm", "--world", "4")
    assert code == 1 and "vlm.forge:38:3: error[E120]: plan 'fsdp2_vlm' needs 2 ranks" in err
    code, _, err = run("plan", str(mid / "nope.forge"), "--plan", "x", "--world", "1")
    assert code == 2 and "no such file" in err
    assert "Traceback" not in err


def test_text_report():
    code, out, err = run("plan", DEBUG, "--plan", "fsdp2_pp2", "--world", "4")
    assert code == 0, err
    assert out.startswith("plan fsdp2_pp2 for llama_debug: 4 ranks (dp 2 × pp 2)")
    assert "pipeline 1f1b, 2 microbatches, 2 stages" in out
    assert "peak: rank " in out


# ---- vision-language models -------------------------------------------------------------

XATTN_PLANS = """
plan fsdp2_x for vlm_xattn {
  mesh(dp = 2)
  fsdp()
}

plan fsdp2_x_ckpt for vlm_xattn {
  mesh(dp = 2)
  fsdp()
  activation_checkpoint(default = full)
}
"""


def generated_package(name: str):
    from forgec.runtime.package import import_package

    return import_package(str(ROOT / "generated" / name))


@pytest.fixture(scope="module")
def xattn_spec(tmp_path_factory):
    """vlm_xattn (and the specs it imports) with two FSDP plans of its own."""
    import shutil

    folder = tmp_path_factory.mktemp("xattn")
    for name in ("llama_debug", "vlm", "vlm_xattn"):
        shutil.copy(ROOT / "specs" / f"{name}.forge", folder)
    with open(folder / "vlm_xattn.forge", "a", encoding="utf-8") as f:
        f.write(XATTN_PLANS)
    return str(folder / "vlm_xattn.forge")


def test_vlm_shards_follow_fsdp2_at_every_rank():
    """Per-rank parameters of the VLM plan against the DTensors fully_shard makes
    of the whole VLM (vision encoder, adapter, decoder) at each rank of a fake
    2-rank group."""
    import importlib

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    pkg = generated_package("vlm")
    plan = importlib.import_module(f"{pkg.__name__}.plan")
    r = plan_report(VLM, "fsdp2_vlm", 2)
    assert r["params_total"] == r["params_stored"] == 1_116_000
    for rank in range(2):
        _init_fake(rank, 2)
        try:
            with torch.device("meta"):
                model = pkg.VLM()
            apply_fsdp(model, init_device_mesh("cpu", (2,)), plan, "fsdp2_vlm")
            for unit in ("vision_encoder.layers.1", "transformer.layers.3"):
                assert isinstance(model.get_submodule(unit), FSDPModule)
            local = sum(p.to_local().numel() for p in model.parameters())
        finally:
            _destroy()
        assert r["per_rank"][rank]["params"] == local
        assert r["per_rank"][rank]["param_bytes"] == 4 * local
    assert r["per_rank"][0]["params"] > r["per_rank"][1]["params"]  # odd rows: uneven chunks


@pytest.mark.parametrize("name, decoder_seq", [("vlm", 64 + 26), ("vlm_xattn", 26)])
def test_vlm_saved_activations_match_a_real_forward(name, decoder_seq):
    """The meta-device measurement of a VLM's forward (vision encoder, adapter,
    decoder with the image tokens in its sequence or cross-attending to them)
    against autograd's saved tensors of the same forward on CPU."""
    from forgec.runtime.planner import example_batch, measure_activations

    pkg = generated_package(name)
    acts = measure_activations(pkg, 2, 26, torch.float32)
    torch.manual_seed(0)
    model = pkg.VLM()
    args, kwargs, targets = example_batch(model, 2, 26, torch.float32, device="cpu")
    saved = saved_on_cpu(model, targets, torch.randn_like(args[0]), args[1], **kwargs)
    assert sum(acts.saved.values()) == saved
    assert acts.logits_bytes == 2 * 26 * 256 * 4  # at this vocabulary one chunk holds them all
    assert acts.order[:5] == ["vision_encoder.patch_embedding", "vision_encoder.layers.0",
                              "vision_encoder.layers.1", "vision_encoder.norm", "adapter"]
    assert acts.shapes["transformer.layers.0"] == (2, decoder_seq, 128)
    assert acts.saved["vision_encoder.layers.0"] > 0 and acts.saved["adapter"] > 0
    if name == "vlm_xattn":
        assert acts.saved["transformer.cross_attention_layers.1"] > 0


def test_vlm_activation_checkpointing_keeps_the_layer_inputs(xattn_spec):
    """Checkpointed decoder layers keep their input (B, 26, 128) only, plus one
    layer's activations rebuilt in backward; the cross-attention blocks are
    FSDP units of their own."""
    plain = plan_report(xattn_spec, "fsdp2_x", 2, micro_batch=2, seq_len=26)
    ckpt = plan_report(xattn_spec, "fsdp2_x_ckpt", 2, micro_batch=2, seq_len=26)
    saved = plain["saved_bytes_per_microbatch"]
    layers = [saved[f"transformer.layers.{i}"] for i in range(4)]
    assert plain["per_rank"][0]["activation_bytes"] == sum(saved.values())
    assert ckpt["per_rank"][0]["activation_bytes"] == (
        sum(saved.values()) - sum(layers) + 4 * 2 * 26 * 128 * 4 + max(layers))
    assert plain["vlm"] == {**plain["vlm"], "image_tokens": 16, "text_tokens": 26,
                            "decoder_seq_len": 26}
    # the cross-attention blocks' parameters are sharded like any unit's
    assert plain["params_stored"] == plain["params_total"]
    assert [row["params"] for row in plain["per_rank"]] == \
        [row["params"] for row in ckpt["per_rank"]]


def test_vlm_pipeline_ranks_hold_their_stages():
    """specs/vlm.forge's pp2_vlm (the vision encoder, the adapter and two decoder
    layers on the first stage): each rank holds what the emitted plan's
    build_stage keeps, and its activations and buffers are its stage's."""
    import importlib

    from forgec.runtime.planner import _report

    pkg = generated_package("vlm")
    plan = importlib.import_module(f"{pkg.__name__}.plan")
    stages = plan.PLANS["pp2_vlm"]["pipeline"]["stages"]
    counts = []
    for index in range(2):
        with torch.device("meta"):
            stage = build_stage(pkg.VLM(), index, plan, "pp2_vlm")
        counts.append(sum(p.numel() for p in stage.parameters()))
    r = _report(pkg, "vlm", "pp2_vlm", 2, 2, 26, 128)
    rank0, rank1 = r["per_rank"]
    assert [rank0["params"], rank1["params"]] == counts and sum(counts) == 1_116_000
    saved = r["saved_bytes_per_microbatch"]
    first = sum(n for u, n in saved.items() if any(u == k or u.startswith(k + ".")
                                                   for k in stages[0]))
    second = sum(saved.values()) - first
    hidden = 2 * (64 + 26) * 128 * 4  # a microbatch's decoder hidden state at the cut
    # 1F1B on 2 stages: rank 0 holds 2 microbatches in flight, each with its output
    assert rank0["activation_bytes"] == 2 * (first + hidden)
    # rank 1's first layer saves its input, the received buffer (counted once, below)
    assert rank1["activation_bytes"] == second - hidden
    # a receive buffer per microbatch on rank 1, a gradient buffer per microbatch on rank 0
    assert rank0["pipeline_buffer_bytes"] == rank1["pipeline_buffer_bytes"] == 4 * hidden
    assert (rank0["logits_bytes"], rank1["logits_bytes"]) == (0, 2 * 26 * 256 * 4)
    assert r["vlm"]["decoder_seq_len"] == 64 + 26


def test_moe_saved_activations_match_a_real_forward():
    """On the meta device the experts' row counts are placeholders and their
    grouped matmuls a stand-in that saves what torch._grouped_mm saves; with no
    capacity drops (the estimate's assumption: every token reaches its top_k
    experts) a real CPU forward saves the same, to 0.5 %."""
    from forgec.runtime.planner import measure_activations

    pkg = generated_package("moe_debug")
    acts = measure_activations(pkg, 2, 64, torch.float32)
    torch.manual_seed(0)
    model = pkg.Transformer()
    for module in model.modules():
        if hasattr(module, "capacity_factor"):
            module.capacity_factor = 0.0
    tokens = torch.randint(0, 256, (2, 65))
    saved = saved_on_cpu(model, tokens[:, 1:], tokens[:, :-1],
                         doc_ids=torch.zeros(2, 64, dtype=torch.long))
    # (what the experts save is ~6 % of it: leaving it out fails this)
    assert abs(sum(acts.saved.values()) - saved) <= 0.005 * saved


def test_expert_parallel_ranks_hold_their_experts():
    """ep2: each of the 2 ranks holds half of every MoE layer's experts (not
    FSDP-sharded) and half of the rest (FSDP). (Against a real run's shards and
    peak memory: tests/test_planner_ranks.py.)"""
    ep2 = plan_report(str(ROOT / "specs" / "moe_debug.forge"), "ep2", 2)
    with torch.device("meta"):
        model = generated_package("moe_debug").Transformer()
    total = sum(p.numel() for p in model.parameters())
    assert [row["params"] for row in ep2["per_rank"]] == [total // 2] * 2
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts % 2 == 0 and ep2["params_stored"] == total


def test_models_routed_by_modality_are_refused_in_one_line(tmp_path):
    """A MoT decoder picks each token's weights by its modality, a value the meta
    device has not: a one-line error, not an internal error."""
    import shutil

    for name in ("llama_debug", "vlm", "vlm_mot"):  # vlm_mot imports vlm, which imports llama
        shutil.copy(ROOT / "specs" / f"{name}.forge", tmp_path)
    with open(tmp_path / "vlm_mot.forge", "a", encoding="utf-8") as f:
        f.write("\nplan fsdp2_mot for vlm_mot {\n  mesh(dp = 2)\n  fsdp()\n}\n")
    code, out, err = run("plan", str(tmp_path / "vlm_mot.forge"), "--plan", "fsdp2_mot",
                         "--world", "2")
    assert code == 1 and out == ""
    assert err.startswith("forgec: error: forgec plan cannot measure this model's activations "
                          "on the meta device: its forward depends on tensor values (") \
        and err.count("\n") == 1, err
    assert err.endswith("modality-routed (MoT, MoMa) models are not modelled yet\n"), err
