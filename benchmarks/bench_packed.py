"""Packed sequences: `doc_ids` attention vs plain causal attention in the generated model.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_packed.py [--runs 3] [--warmup 1] [--docs 8]
        [--seqs 512,1024,2048,4096,8192] [--batch 1]

The benchmark model of benchmarks/_common.py (width 512, 8 layers), with room
for the longest `--seqs` (max_position_embeddings), fp32. With `doc_ids` every
sequence holds `--docs` documents of equal length: in training the generated
model then confines attention to each document (compiler/ops/attention's
DocumentMask: on the CPU one SDPA call per document, causal within it; no
(B, 1, S, S) mask); without, SDPA's `is_causal` path runs over the whole
sequence. Timed per sequence length: forward + backward of the training loss
(`model(ids, doc_ids=..., targets=...)`), and the forward alone (no grad),
interleaved with the plain causal run, median of `--runs`. Prints
doc_ids / causal as a ratio of times (below 1: packed is faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--docs", type=int, default=8, help="documents per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqs", default="512,1024,2048,4096,8192",
                   help="sequence lengths, comma-separated")
    p.add_argument("--forward", action="store_true", help="time the forward alone too")
    p.add_argument("--layers", type=int, default=C.CONFIG["num_hidden_layers"])
    p.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="measure the process's CPU time rather than wall time (a shared, "
                        "oversubscribed machine: waiting for a core is not counted)")
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package")
    args = p.parse_args()
    seqs = [int(x) for x in args.seqs.split(",")]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-packed-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder, {**C.CONFIG, "max_position_embeddings": max(seqs),
                               "num_hidden_layers": args.layers})
    model = C.load_models(folder, "forgec").train()
    print(f"machine: {C.machine()}")
    print(f"{args.layers} layers, batch {args.batch}, {args.docs} documents of equal length per "
          f"sequence; median of {args.runs} after {args.warmup} warm-up, interleaved; "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    rows = []
    for seq in seqs:
        torch.manual_seed(1)
        ids = torch.randint(0, C.CONFIG["vocab_size"], (args.batch, seq + 1))
        inputs, targets = ids[:, :-1], ids[:, 1:]
        doc_ids = (torch.arange(seq) * args.docs // seq).expand(args.batch, seq).contiguous()

        def forward(docs, inputs=inputs):
            @torch.no_grad()
            def run():
                model(inputs, doc_ids=docs)
            return run

        def train(docs, inputs=inputs, targets=targets):
            def run():
                model.zero_grad(set_to_none=True)
                model(inputs, doc_ids=docs, targets=targets).backward()
            return run

        phases = [("forward + backward", train)] + ([("forward", forward)] if args.forward else [])
        for label, make in phases:
            times = C.alternate({"causal": make(None), "doc_ids": make(doc_ids)},
                                args.runs, args.warmup,
                                clock=time.process_time if args.cpu_time else time.perf_counter)
            med = {k: C.median(v) for k, v in times.items()}
            ratio = med["doc_ids"] / med["causal"]
            rows.append((seq, label, med, ratio))
            print(f"  S={seq:5d} {label:18s} causal {med['causal'] * 1000:9.0f} ms   doc_ids "
                  f"{med['doc_ids'] * 1000:9.0f} ms   doc_ids / causal {ratio:.3f}×   runs: "
                  + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items()),
                  flush=True)
    print("\n| S | phase | causal | doc_ids | doc_ids / causal (time) |\n|---:|---|---:|---:|---:|")
    for seq, label, med, ratio in rows:
        print(f"| {seq} | {label} | {med['causal'] * 1000:.0f} ms | {med['doc_ids'] * 1000:.0f} ms "
              f"| {ratio:.3f}× |")


if __name__ == "__main__":
    main()
