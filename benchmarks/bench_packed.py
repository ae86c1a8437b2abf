"""Packed sequences: `doc_ids` attention vs plain causal attention in the generated model.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_packed.py [--runs 5] [--warmup 2] [--docs 4]

The benchmark model of benchmarks/_common.py (width 512, 8 layers), fp32, batch
2 × 512 tokens. With `doc_ids` every sequence holds `--docs` documents of equal
length: the generated model then builds a (B, 1, S, S) boolean mask (causal and
same-document) and SDPA takes its masked path; without, SDPA's `is_causal` path
runs with no mask at all. Timed: forward alone (no grad) and forward + backward
(cross-entropy), interleaved with the plain causal run, median of `--runs`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BATCH, SEQ = 2, 512


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--docs", type=int, default=4, help="documents per sequence")
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder)
    model = C.load_models(folder, "forgec").train()
    print(f"machine: {C.machine()}")
    torch.manual_seed(1)
    ids = torch.randint(0, C.CONFIG["vocab_size"], (BATCH, SEQ))
    doc_ids = (torch.arange(SEQ) * args.docs // SEQ).expand(BATCH, SEQ).contiguous()

    def forward(docs):
        @torch.no_grad()
        def run():
            model(ids, doc_ids=docs)
        return run

    def train(docs):
        def run():
            model.zero_grad(set_to_none=True)
            logits = model(ids, doc_ids=docs)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                            ids[:, 1:].reshape(-1)).backward()
        return run

    for label, make in (("forward", forward), ("forward + backward", train)):
        times = C.alternate({"causal": make(None), "doc_ids": make(doc_ids)},
                            args.runs, args.warmup)
        tps = {k: BATCH * SEQ / C.median(v) for k, v in times.items()}
        print(f"\n{label} (batch {BATCH} × {SEQ}, {args.docs} documents per sequence), "
              f"median of {args.runs}:")
        for k, v in times.items():
            print(f"  {k:8s} {C.median(v) * 1000:8.0f} ms  {tps[k]:8.0f} tokens/s   "
                  f"runs: {', '.join(f'{t:.2f}' for t in v)} s")
        print(f"  doc_ids / causal: {tps['doc_ids'] / tps['causal']:.3f}×")


if __name__ == "__main__":
    main()
