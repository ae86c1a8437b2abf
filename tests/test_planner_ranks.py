"""`forgec plan`'s memory estimate against the peak each rank of a real
multi-process training run reaches on CPU (gloo, 127.0.0.1).

One spawn of 2 ranks runs, in turn, the debug model's FSDP plan (`fsdp2`), its
1F1B pipeline (`pp2`, 4 microbatches: a steady state with gradients beside the
activations in flight) and GPipe (`pp2_gpipe`: every forward first), and the
VLM's FSDP plan (`fsdp2_vlm`) and 1F1B pipeline (`pp2_vlm`: the vision
encoder on the first stage), and the debug model's tensor-parallel plan
(`tp2`: both ranks run the same rows, each with half the heads and hidden
features), each with the distributed trainer's own engine
(tests/memory_probe.py, `rank_peaks`). Every rank's steady-state peak above
its resident size before the model must be within 15 % of the `total_bytes`
that `forgec plan --world 2 --json` gives that rank, and the parameter
elements the rank stores must equal its `params`. The batch sizes are
chosen so that weights, AdamW and activations are all of a size (a term left
out or counted twice moves a figure by more than the tolerance).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli
from dist_helpers import spawn
from memory_probe import rank_peaks

from forgec.compiler.build import build
from forgec.compiler.driver import compile_spec

TOLERANCE = 0.15
TEXT_BATCH, TEXT_SEQ = 8, 64  # global batch; per rank 4 × 64 (FSDP), 2 × 64 (pp2 microbatch)
VLM_BATCH = 8  # images; the caption task fixes the text at 26 tokens
# (tag, spec, plan, global batch, seq_len, warm-up batch, plan's micro-batch per rank)
RUNS = [
    ("fsdp2", "llama_debug", "fsdp2", TEXT_BATCH, TEXT_SEQ, 2, TEXT_BATCH // 2),
    ("pp2", "llama_debug", "pp2", TEXT_BATCH, TEXT_SEQ, 4, TEXT_BATCH // 4),
    ("pp2_gpipe", "llama_debug", "pp2_gpipe", TEXT_BATCH, TEXT_SEQ, 2, TEXT_BATCH // 2),
    ("fsdp2_vlm", "vlm", "fsdp2_vlm", VLM_BATCH, None, 2, VLM_BATCH // 2),
    ("pp2_vlm", "vlm", "pp2_vlm", VLM_BATCH, None, 4, VLM_BATCH // 4),
    ("tp2", "llama_debug", "tp2", TEXT_BATCH // 2, TEXT_SEQ, 2, TEXT_BATCH // 2),
    ("ep2", "moe_debug", "ep2", TEXT_BATCH, TEXT_SEQ, 2, TEXT_BATCH // 2),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[tuple[str, int], dict]:
    """{(tag, rank): {"delta": peak bytes above the rank's resident size before
    the model, "params": parameter elements the rank stores}}."""
    tmp = tmp_path_factory.mktemp("plan_ranks")
    pkgs = {name: build(compile_spec(str(ROOT / "specs" / f"{name}.forge")), str(tmp),
                        update=True).package for name in ("llama_debug", "moe_debug", "vlm")}
    runs = [{"tag": tag, "pkg": pkgs[spec], "plan": plan, "batch_size": batch,
             "seq_len": seq, "warm_batch": warm}
            for tag, spec, plan, batch, seq, warm, _ in RUNS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks share the 2 cores with this process
    try:
        spawn(rank_peaks, (runs, str(tmp)), 2, tmp, timeout=300)
    finally:
        torch.set_num_threads(threads)
    return {(tag, rank): json.loads(Path(tmp, f"{tag}.rank{rank}.json").read_text())
            for tag, *_ in RUNS for rank in range(2)}


def estimate(spec: str, plan: str, micro_batch: int, seq_len: int | None) -> dict:
    args = ["plan", str(ROOT / "specs" / f"{spec}.forge"), "--plan", plan, "--world", "2",
            "--micro-batch", str(micro_batch), "--json"]
    if seq_len is not None:
        args += ["--seq-len", str(seq_len)]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("tag, spec, plan, batch, seq, warm, micro_batch", RUNS,
                         ids=[r[0] for r in RUNS])
def test_estimate_within_15_percent_of_each_ranks_peak(measured, tag, spec, plan, batch, seq,
                                                       warm, micro_batch):
    r = estimate(spec, plan, micro_batch, seq if seq is not None else 26)
    rows = r["per_rank"]
    assert [row["rank"] for row in rows] == [0, 1]
    report = []
    for row in rows:
        got = measured[(tag, row["rank"])]["delta"]
        report.append(f"rank {row['rank']}: estimate {row['total_bytes'] / 2**20:.2f} MiB, "
                      f"measured {got / 2**20:.2f} MiB "
                      f"({100 * (row['total_bytes'] - got) / got:+.1f} %)")
    print(f"{tag}: " + "; ".join(report))
    for row in rows:
        got = measured[(tag, row["rank"])]["delta"]
        assert abs(row["total_bytes"] - got) <= TOLERANCE * got, (tag, report, row)
    assert [row["params"] for row in rows] == [measured[(tag, rank)]["params"]
                                               for rank in range(2)], tag
    if plan.startswith("pp2"):
        # the two stages differ (embedding vs head, in-flight microbatches): the
        # estimate must tell them apart as the measurement does
        assert rows[0]["total_bytes"] != rows[1]["total_bytes"]
