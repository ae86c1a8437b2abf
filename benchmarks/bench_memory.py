"""Peak memory of a training step at a 128,256-token vocabulary: the generated
model's fused, chunked head + cross-entropy against transformers.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_memory.py [--dir /tmp/forgec-bench-128k] [--batch 2] [--seq 512]

The model is benchmarks/_common.py's (width 512, 8 layers) with Llama 3's
vocabulary of 128,256 tokens, untied: 163 M parameters, of which the embedding
and the head hold 131 M. Both libraries load the same fp32 weights.

Measured as bench_hf.py measures memory: each cell in a fresh process, the model
built, loaded and called once on 4 tokens, the peak-RSS counter reset, one
training step from no gradients and an empty AdamW (forward, loss, backward,
AdamW step: the gradients and AdamW's two moments are counted, the same for
every cell), then peak RSS above the RSS before the step. The cells:

* forgec, fused: what `forgec train` runs, `model(ids, targets=...)`: the
  summed cross-entropy chunk by chunk; the full logits never exist;
* forgec, logits: the generated model's logits, then F.cross_entropy (the
  plain path, what every trainer did before);
* transformers: its logits, then F.cross_entropy, as bench_hf.py.

Prints each peak and the ratio to transformers'.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CONFIG = {**C.CONFIG, "vocab_size": 128256}
CELLS = ("forgec-fused", "forgec-logits", "hf")


def child(folder: Path, cell: str, batch: int, seq: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    is_hf = cell == "hf"
    model = C.load_models(folder, "hf" if is_hf else "forgec").train()
    vocab = CONFIG["vocab_size"]
    tiny = torch.randint(0, vocab, (1, 4))  # one-time lazy set-up is not counted
    (model(input_ids=tiny).logits if is_hf else model(tiny)).sum().backward()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, vocab, (batch, seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if cell == "forgec-fused":
            targets = ids[:, 1:]
            loss = model(ids[:, :-1], targets=targets) / targets.numel()
        else:
            logits = model(input_ids=ids).logits if is_hf else model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return float(loss)

    before = C.reset_peak_rss()
    loss = step()
    print(json.dumps({"before": before, "peak": C.peak_rss(), "loss": loss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package "
                   "(default: a temporary folder)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--child", choices=CELLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.dir, args.child, args.batch, args.seq)
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-128k-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder, CONFIG)
    print(f"machine: {C.machine()}")
    print(f"vocabulary {CONFIG['vocab_size']:,}, batch {args.batch} × {args.seq} tokens, fp32; "
          "peak RSS of one training step above the loaded model (fresh process per cell):")
    peaks, losses = {}, {}
    for cell in CELLS:
        out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--child", cell,
                              "--batch", str(args.batch), "--seq", str(args.seq)],
                             capture_output=True, text=True, check=True)
        data = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[cell], losses[cell] = data["peak"] - data["before"], data["loss"]
    for cell in CELLS:
        print(f"  {cell:14s} {peaks[cell] / 2**20:8.1f} MiB   {peaks[cell] / peaks['hf']:.3f}× "
              f"transformers'   (loss {losses[cell]:.6f})")
    print(f"forgec (fused) / transformers: {peaks['forgec-fused'] / peaks['hf']:.3f}×")


if __name__ == "__main__":
    main()
