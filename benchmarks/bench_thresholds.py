"""Where the compiler switches implementations: the measurements behind two thresholds.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_thresholds.py [--runs 40]

1. Packed documents (`doc_ids`) in training. A model whose max_seq_len reaches
   compiler/emit.py's DOCUMENT_SPANS_FROM (512) attends one document at a time
   (compiler/ops/attention's DocumentMask: one SDPA call per document on the CPU);
   a shorter one makes one SDPA call with the documents' (B, 1, S, S) boolean mask.
   Timed: forward + backward of attention alone, 4 rows, 4 query heads over 2 KV
   heads of 32 channels, documents of 64 to 128 tokens cut at random places.
2. The head's loss. A head whose vocabulary is more than FUSED_LOSS_WIDTH (4) times
   the model wide computes its cross-entropy chunk by chunk (compiler/ops/embedding's
   LinearCrossEntropy); a narrower one computes full logits, then F.cross_entropy.
   Timed: forward + backward of the summed loss.

Each pair runs interleaved, call by call; the median of `--runs` is printed, and
the ratio first / second (below 1: the first is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from forgec.compiler.ops.attention.modules import DocumentMask
from forgec.compiler.ops.embedding.modules import IGNORE_INDEX, OutputHead


def timed(fn) -> float:
    start = time.perf_counter()
    fn().sum().backward()
    return time.perf_counter() - start


def medians(first, second, runs: int) -> tuple[float, float]:
    for _ in range(3):
        timed(first), timed(second)
    a, b = [], []
    for _ in range(runs):
        a.append(timed(first))
        b.append(timed(second))
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def random_documents(generator: torch.Generator, rows: int, seq: int, docs: int) -> torch.Tensor:
    ids = torch.zeros(rows, seq, dtype=torch.long)
    for row in range(rows):
        cuts = torch.randperm(seq - 1, generator=generator)[: docs - 1] + 1
        for cut in cuts.tolist():
            ids[row, cut:] += 1
    return ids


def attend_spans(doc_ids, q, k, v) -> torch.Tensor:
    return DocumentMask(doc_ids).attend(q, k, v)


def plain_loss(head: OutputHead, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head.proj(x).flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def document_spans(runs: int) -> None:
    print("packed documents: per-document SDPA calls vs one call with a boolean mask")
    print(f"{'tokens':>7} {'documents':>10} {'spans ms':>9} {'mask ms':>8} {'spans/mask':>11}")
    generator = torch.Generator().manual_seed(0)
    for seq in (128, 256, 512, 1024, 2048):
        docs = max(2, seq // 128)
        doc_ids = random_documents(generator, 4, seq, docs)
        q = torch.randn(4, 4, seq, 32, generator=generator, requires_grad=True)
        k = torch.randn(4, 2, seq, 32, generator=generator, requires_grad=True)
        v = torch.randn(4, 2, seq, 32, generator=generator, requires_grad=True)
        pos = torch.arange(seq)
        mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & (pos <= pos[:, None])
        spans = partial(attend_spans, doc_ids, q, k, v)
        masked = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, enable_gqa=True)
        a, b = medians(spans, masked, max(5, runs * 128 // seq))
        print(f"{seq:>7} {docs:>10} {a:>9.2f} {b:>8.2f} {a / b:>10.2f}x")


def head_loss(runs: int) -> None:
    print("head + cross-entropy: fused (chunked) vs full logits + F.cross_entropy")
    print(f"{'dim':>5} {'vocab':>6} {'tokens':>7} {'fused ms':>9} {'plain ms':>9} {'fused/plain':>12}")
    generator = torch.Generator().manual_seed(0)
    for dim, vocab, tokens in ((64, 256, 4096), (128, 256, 4096), (128, 256, 512),
                               (128, 512, 4096), (128, 1024, 4096), (256, 4096, 4096)):
        head = OutputHead(dim, vocab)
        x = torch.randn(1, tokens, dim, generator=generator, requires_grad=True)
        targets = torch.randint(0, vocab, (1, tokens), generator=generator)
        fused = partial(head, x, targets)  # the op module: every feature on, the fused loss
        a, b = medians(fused, partial(plain_loss, head, x, targets), runs)
        print(f"{dim:>5} {vocab:>6} {tokens:>7} {a:>9.2f} {b:>9.2f} {a / b:>11.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40, help="timed calls of each, interleaved")
    args = p.parse_args()
    torch.manual_seed(0)
    document_spans(args.runs)
    print()
    head_loss(args.runs)


if __name__ == "__main__":
    main()
