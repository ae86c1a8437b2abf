"""Peak memory of a training step at a 128,256-token vocabulary: the generated
model's fused, chunked head + cross-entropy against transformers.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_memory.py [--dir /tmp/forgec-bench-128k] [--batch 2] [--seq 512] [--adamw fused|plain]

The model is benchmarks/_common.py's (width 512, 8 layers) with Llama 3's
vocabulary of 128,256 tokens, untied: 158.6 M parameters, of which the embedding
and the head hold 131 M. Both libraries load the same fp32 weights.

Measured as bench_hf.py measures memory: each cell in a fresh process, the model
built, loaded and called once on 4 tokens, the peak-RSS counter reset, one
training step from no gradients and an empty AdamW (forward, loss, backward,
grad-norm clipping, AdamW step: the gradients and AdamW's two moments are
counted, the same for every cell), then peak RSS above the RSS before the
step; the counter is reset at each phase too, so the peak of each phase
(above the same starting RSS) says where the step's peak is. Then a second
step, the steady one, above the RSS before it: AdamW's moments exist then
and are not counted, which is what a long run's steps look like; and the
second step's peak above the loaded model too (the moments counted), which
the heap a first step keeps or gives back cannot move. All are reported, each
against transformers' same figure. The cells:

* forgec, fused: what `forgec train` runs: runtime.loop's loss
  (`TextTask.loss`, i.e. `model(ids, doc_ids=..., targets=...)`: the summed
  cross-entropy chunk by chunk, the full logits never exist), its
  optimizer (`make_optimizer`: fused AdamW) and its step (`optimizer_step`:
  the first step, which creates AdamW's moments, a slice of a parameter at a
  time, the first moment taking the gradient's storage, after the C heap's
  free pages went back to the OS);
* forgec, logits: the generated model's logits, then F.cross_entropy (the
  plain path, what every trainer did before);
* transformers: its logits, then F.cross_entropy.

`--adamw fused` (the default) gives the two logits cells fused AdamW as well
(transformers' Trainer's default optimizer since torch 2.8); `--adamw plain`
gives every cell torch.optim.AdamW's default, on the CPU the single-tensor loop,
whose temporaries (two of the largest parameter's size) were most of the
step's peak in the figures of 2026-12-05 before this option existed.

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


PHASES = ("forward", "backward", "clip", "step")


def child(folder: Path, cell: str, batch: int, seq: int, adamw: str) -> None:
    import torch
    import torch.nn.functional as F

    from forgec.runtime.loop import TextTask, make_optimizer, micro_batch_loss, optimizer_step
    from forgec.runtime.train import Settings

    torch.manual_seed(0)
    is_hf = cell == "hf"
    model = C.load_models(folder, "hf" if is_hf else "forgec").train()
    vocab = CONFIG["vocab_size"]
    tiny = torch.randint(0, vocab, (1, 4))  # one-time lazy set-up is not counted
    (model(input_ids=tiny).logits if is_hf else model(tiny)).sum().backward()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, vocab, (batch, seq))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if cell == "forgec-fused" and adamw == "fused":
        # forgec train's own optimizer (fused AdamW, no decay on vectors)
        opt = make_optimizer(model, Settings(lr=1e-4))
    else:  # the Trainer's default since torch 2.8 (fused), or the single-tensor loop
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=adamw == "fused")
    params = [p for p in model.parameters() if p.requires_grad]
    doc_ids = torch.zeros_like(inputs)

    def forward():
        if cell == "forgec-fused":  # forgec train's loss, as runtime.loop.accumulate takes it
            cross_entropy = TextTask(None).loss(model, (inputs, targets, doc_ids))
            return micro_batch_loss(model, cross_entropy, targets.numel(), 1)
        logits = model(input_ids=ids).logits if is_hf else model(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets.reshape(-1))

    state = {}
    phases = {
        "forward": lambda: state.update(loss=forward()),
        "backward": lambda: state.pop("loss").backward(),  # the loss and its graph go
        "clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        # forgec train's step; the others as the Trainer steps
        "step": (lambda: optimizer_step(opt)) if cell == "forgec-fused" else opt.step,
    }
    loaded = C.reset_peak_rss()  # the loaded model, before the first step

    def measured_step() -> tuple[dict[str, int], int]:
        before = C.reset_peak_rss()
        peaks, top = {}, 0
        for name in PHASES:  # the peak of each phase above the RSS before the step
            C.reset_peak_rss()
            if name == "backward":
                state["value"] = float(state["loss"])
            phases[name]()
            peaks[name] = C.peak_rss() - before
            top = max(top, C.peak_rss() - loaded)
        opt.zero_grad(set_to_none=True)
        return peaks, top

    first, _ = measured_step()  # from no gradients and an empty AdamW
    loss = state["value"]
    steady, steady_above_loaded = measured_step()  # AdamW's moments exist, no gradients
    print(json.dumps({"peaks": first, "steady": steady, "loss": loss,
                      "steady_above_loaded": steady_above_loaded}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package "
                   "(default: a temporary folder)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--adamw", choices=("fused", "plain"), default="fused",
                   help="fused: forgec train's and the Trainer's AdamW (default); plain: the "
                   "single-tensor loop torch.optim.AdamW() runs on the CPU by default")
    p.add_argument("--cells", default=",".join(CELLS), help="which cells, comma-separated")
    p.add_argument("--child", choices=CELLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.dir, args.child, args.batch, args.seq, args.adamw)
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-128k-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder, CONFIG)
    cells = args.cells.split(",")
    print(f"machine: {C.machine()}")
    print(f"vocabulary {CONFIG['vocab_size']:,}, batch {args.batch} × {args.seq} tokens, fp32, "
          f"{args.adamw} AdamW; peak RSS of one training step above the loaded model (fresh "
          "process per cell), and of each phase of it:")
    peaks, losses, steady, above_loaded = {}, {}, {}, {}
    for cell in cells:
        out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--child", cell,
                              "--batch", str(args.batch), "--seq", str(args.seq),
                              "--adamw", args.adamw],
                             capture_output=True, text=True, check=True)
        data = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[cell], losses[cell] = data["peaks"], data["loss"]
        steady[cell], above_loaded[cell] = data["steady"], data["steady_above_loaded"]
    ref = max(peaks["hf"].values()) if "hf" in peaks else None
    for cell in cells:
        peak = max(peaks[cell].values())
        phases = "  ".join(f"{k} {v / 2**20:6.0f}" for k, v in peaks[cell].items())
        ratio = f"{peak / ref:.3f}× transformers'" if ref else ""
        print(f"  {cell:14s} {peak / 2**20:8.1f} MiB  {ratio}  (loss {losses[cell]:.6f}; MiB "
              f"by phase: {phases})")
    print("the second step (AdamW's moments allocated before it, no gradients), peak RSS "
          "above the RSS before it:")
    ref_steady = max(steady["hf"].values()) if "hf" in steady else None
    for cell, cell_peaks in steady.items():
        peak = max(cell_peaks.values())
        phases = "  ".join(f"{k} {v / 2**20:6.0f}" for k, v in cell_peaks.items())
        ratio = f"{peak / ref_steady:.3f}× transformers'" if ref_steady else ""
        print(f"  {cell:14s} {peak / 2**20:8.1f} MiB  {ratio}  (MiB by phase: {phases})")
    print("the second step's peak above the loaded model (the first step's baseline: AdamW's "
          "moments counted, and the heap the first step kept or gave back):")
    ref_loaded = above_loaded.get("hf")
    for cell, peak in above_loaded.items():
        ratio = f"{peak / ref_loaded:.3f}× transformers'" if ref_loaded else ""
        print(f"  {cell:14s} {peak / 2**20:8.1f} MiB  {ratio}")
    if ref and "forgec-fused" in peaks:
        print(f"forgec (fused) / transformers: first step "
              f"{max(peaks['forgec-fused'].values()) / ref:.3f}×, steady step "
              f"{max(steady['forgec-fused'].values()) / ref_steady:.3f}×")


if __name__ == "__main__":
    main()
