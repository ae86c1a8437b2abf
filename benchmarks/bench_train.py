"""The training step side by side, in one run: the generated model (eager, and
compiled per block as `forgec train --compile` does) against transformers
(eager, and with torch.compile), packed documents against plain causal
attention, and the machine's utilisation.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_train.py [--dir /tmp/forgec-bench] [--runs 5] [--warmup 2]

The model and weights are benchmarks/_common.py's (width 512, 8 layers,
vocabulary 8192, fp32, 35.7 M parameters), batch 2 × 512 tokens. One step:

* forgec: exactly what `forgec train` runs, its single-process engine
  (runtime.loop.LocalEngine.step): forward with the fused head + cross-entropy
  (`model(inputs, doc_ids=..., targets=...)`), backward, grad-norm clipping
  to 1.0, fused AdamW, zero_grad. `forgec compiled` is the same engine with
  `compile=True` (runtime.parallel.apply_compile: each block's forward through
  torch.compile(fullgraph=True), inductor). The batch is one document per row
  (`doc_ids` all 0), as a corpus of documents longer than the sequence gives;
  `forgec packed` is the eager engine on rows of 8 documents of 64 tokens.
* transformers: what its Trainer runs: `model(input_ids, labels=...)` (its own
  shifted cross-entropy over the full logits), backward, clip_grad_norm_(1.0),
  fused AdamW (the Trainer's default optimizer since torch 2.8), zero_grad.
  `transformers compiled` is `torch.compile(model)` (inductor), as the Trainer's
  `torch_compile=True` does.
* matmul: a 2048 × 2048 fp32 matmul, timed in the same rounds.

Every variant runs in this process, interleaved round by round (the order
reversed every other round); `--warmup` rounds (compilation included) are not
timed; the median of `--runs` is reported, and each ratio is of two medians
of this run. Utilisation = the step's model FLOP/s ÷ the matmul's FLOP/s, with
model FLOPs per token = 6 × (parameters − embedding table) + 12 × layers ×
width × sequence (the PaLM / torchtitan convention: attention's two matmuls
without halving for causality).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BATCH, SEQ, DOCS = 2, 512, 8


def loaded_task(model):
    """runtime.loop.TextTask whose model is the one loaded with the benchmark's weights."""
    from forgec.runtime.loop import TextTask

    class LoadedTask(TextTask):
        def new_model(self):
            return model
    return LoadedTask(None)


def forgec_step(model, compile: bool, batch):
    from forgec.runtime.loop import LocalEngine
    from forgec.runtime.train import Settings

    engine = LocalEngine(loaded_task(model), Settings(lr=1e-4, compile=compile, clip=1.0))
    state = {"step": 0}

    def step():
        state["step"] += 1
        engine.step(batch, state["step"])
    return step


def hf_step(model, compile: bool, ids):
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    forward = torch.compile(model) if compile else model

    def step():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def matmul_fn(n: int = 2048):
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: a @ b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package "
                   "(default: a temporary folder)")
    p.add_argument("--only", help="comma-separated variants (default: all)")
    args = p.parse_args()

    import tempfile

    import torch

    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder)
    print(f"machine: {C.machine()}")
    torch.manual_seed(1)
    vocab = C.CONFIG["vocab_size"]
    ids = torch.randint(0, vocab, (BATCH, SEQ + 1))
    causal = SimpleNamespace(inputs=ids[:, :-1], targets=ids[:, 1:],
                             doc_ids=torch.zeros(BATCH, SEQ, dtype=torch.long))
    packed = SimpleNamespace(inputs=causal.inputs, targets=causal.targets,
                             doc_ids=torch.arange(SEQ).div(SEQ // DOCS, rounding_mode="floor")
                             .expand(BATCH, SEQ).contiguous())
    variants = {
        "forgec": lambda: forgec_step(C.load_models(folder, "forgec"), False, causal),
        "forgec compiled": lambda: forgec_step(C.load_models(folder, "forgec"), True, causal),
        "forgec packed": lambda: forgec_step(C.load_models(folder, "forgec"), False, packed),
        "transformers": lambda: hf_step(C.load_models(folder, "hf"), False, ids[:, :-1]),
        "transformers compiled": lambda: hf_step(C.load_models(folder, "hf"), True, ids[:, :-1]),
        "matmul 2048²": matmul_fn,
    }
    if args.only:
        keep = set(args.only.split(","))
        variants = {k: v for k, v in variants.items() if k in keep or k == "matmul 2048²"}
    fns = {k: make() for k, make in variants.items()}
    model = C.load_models(folder, "forgec")
    params = sum(t.numel() for t in model.parameters())
    matmul_params = params - vocab * C.CONFIG["hidden_size"]  # the embedding does no matmul
    per_token = 6 * matmul_params + 12 * C.CONFIG["num_hidden_layers"] * C.CONFIG["hidden_size"] * SEQ
    print(f"model: {params / 1e6:.1f} M parameters, fp32; batch {BATCH} × {SEQ}; "
          f"{per_token / 1e6:.1f} M model FLOPs per token; {torch.get_num_threads()} threads")

    times = C.alternate(fns, args.runs, args.warmup)
    med = {k: C.median(v) for k, v in times.items()}
    matmul = 2 * 2048**3 / med.pop("matmul 2048²")
    print(f"\nmedian of {args.runs} interleaved rounds after {args.warmup} warm-up rounds:")
    print(f"  matmul 2048² fp32: {matmul / 1e9:7.1f} GFLOP/s   runs: "
          f"{', '.join(f'{t * 1000:.0f}' for t in times['matmul 2048²'])} ms")
    tps = {k: BATCH * SEQ / t for k, t in med.items()}
    for k, t in med.items():
        achieved = tps[k] * per_token
        print(f"  {k:22s} {t * 1000:7.0f} ms/step {tps[k]:7.0f} tokens/s  utilisation "
              f"{achieved / matmul:.3f}   runs: {', '.join(f'{x:.2f}' for x in times[k])} s")
    print("ratios (tokens/s, this run):")
    for a, b in (("forgec", "transformers"), ("forgec", "transformers compiled"),
                 ("forgec compiled", "transformers"),
                 ("forgec compiled", "transformers compiled"),
                 ("forgec compiled", "forgec"), ("transformers compiled", "transformers")):
        if a in tps and b in tps:
            print(f"  {a} / {b}: {tps[a] / tps[b]:.3f}×")
    if "forgec packed" in med and "forgec" in med:
        print(f"  forgec packed ({DOCS} documents per row) / causal, time: "
              f"{med['forgec packed'] / med['forgec']:.3f}×")


if __name__ == "__main__":
    main()
