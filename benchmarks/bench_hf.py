"""Generated model vs transformers: training-step and KV-cache decode throughput, peak memory.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_hf.py [--runs 5] [--warmup 2] [--dir /tmp/forgec-bench]

Both models are the same Llama-style network (benchmarks/_common.py: width 512,
8 layers, vocab 8192) with the same weights, in fp32 on the CPU; transformers
runs its SDPA attention (its default; `--attn eager` for the other one).

* training step: batch 2 × 512 tokens, forward + cross-entropy + backward +
  AdamW step; tokens/s = 1024 / the median step time;
* decode: batch 1, a 64-token prompt (prefill, timed apart), then 128 tokens
  greedily, one forward per token with each library's KV cache (forgec:
  `make_kv_caches`; transformers: the `cache` its forward returns) — the same
  Python loop for both, so `generate()`'s own overhead is not measured;

  both in one process, warmed up, interleaved (ABAB, then BABA), median of
  `--runs`;
* peak memory: each (model, phase) in a fresh process: the model is built and
  loaded and called once on 4 tokens (so one-time lazy set-up is not
  counted), the peak-RSS counter is reset (`/proc/self/clear_refs`), one
  phase runs (a training step from no grads and an empty AdamW; or prefill +
  128 decode steps), and the peak RSS above the resident size before the
  phase is reported. (tracemalloc does not see torch's allocations, and in
  one long process freed memory stays with the allocator, hiding later
  peaks.)
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

BATCH, SEQ = 2, 512
PROMPT, NEW = 64, 128


def train_step_fn(model, is_hf: bool, ids):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits if is_hf else model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
    return step


def decode_fns(model, is_hf: bool, prompt):
    """(prefill, decode) closures; decode continues from the state prefill left."""
    import torch

    model.eval()
    state: dict = {}

    @torch.no_grad()
    def prefill():
        if is_hf:
            out = model(input_ids=prompt, use_cache=True)
            state["cache"], logits = out.cache, out.logits
        else:
            state["cache"] = model.make_kv_caches(1, PROMPT + NEW)
            logits = model(prompt, kv_caches=state["cache"])
        state["next"] = logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def decode():
        x, cache = state["next"], state["cache"]
        for _ in range(NEW):
            if is_hf:
                out = model(input_ids=x, cache=cache, use_cache=True)
                cache, logits = out.cache, out.logits
            else:
                logits = model(x, kv_caches=cache)
            x = logits[:, -1].argmax(-1, keepdim=True)
        state["last"] = int(x)
    return prefill, decode


def memory_child(folder: Path, which: str, phase: str, attn: str) -> None:
    import torch

    torch.manual_seed(0)
    model = C.load_models(folder, which, attn)
    is_hf = which == "hf"
    vocab = C.CONFIG["vocab_size"]
    # one tiny call first, so one-time lazy set-up (imports, caches) is not counted
    tiny = torch.randint(0, vocab, (1, 4))
    if phase == "train":
        logits = model(input_ids=tiny).logits if is_hf else model(tiny)
        logits.sum().backward()
        model.zero_grad(set_to_none=True)
        del logits
        run = train_step_fn(model, is_hf, torch.randint(0, vocab, (BATCH, SEQ)))
    else:
        with torch.no_grad():
            if is_hf:
                model(input_ids=tiny, use_cache=True)
            else:
                model(tiny, kv_caches=model.make_kv_caches(1, 4))
        prefill, decode = decode_fns(model, is_hf, torch.randint(0, vocab, (1, PROMPT)))

        def run():
            prefill()
            decode()
    before = C.reset_peak_rss()
    run()
    print(json.dumps({"before": before, "peak": C.peak_rss()}))


def memory(folder: Path, which: str, phase: str, attn: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--dir", str(folder), "--attn", attn,
                          "--memory-child", which, phase], capture_output=True, text=True,
                         check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["peak"] - data["before"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package "
                   "(default: a temporary folder)")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "PHASE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.dir, *args.memory_child, args.attn)
        return

    import torch

    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder)
    print(f"machine: {C.machine()}")
    models = {"forgec": C.load_models(folder, "forgec"), "hf": C.load_models(folder, "hf", args.attn)}
    n_params = sum(t.numel() for t in models["forgec"].parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters, fp32; transformers attention: {args.attn}")

    torch.manual_seed(1)
    ids = torch.randint(0, C.CONFIG["vocab_size"], (BATCH, SEQ))
    times = C.alternate({k: train_step_fn(m, k == "hf", ids) for k, m in models.items()},
                        args.runs, args.warmup)
    train = {k: BATCH * SEQ / C.median(v) for k, v in times.items()}
    print(f"\ntraining step (batch {BATCH} × {SEQ}, fwd+bwd+AdamW), median of {args.runs}:")
    for k, v in times.items():
        print(f"  {k:7s} {C.median(v) * 1000:8.0f} ms/step  {train[k]:8.0f} tokens/s   "
              f"runs: {', '.join(f'{t:.2f}' for t in v)} s")
    print(f"  forgec / transformers: {train['forgec'] / train['hf']:.3f}×")

    prompt = torch.randint(0, C.CONFIG["vocab_size"], (1, PROMPT))
    fns = {k: decode_fns(m, k == "hf", prompt) for k, m in models.items()}
    pre: dict[str, list[float]] = {k: [] for k in fns}
    dec: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.warmup + args.runs):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            prefill, decode = fns[k]
            t_pre = C.alternate({k: prefill}, 1, 0)[k][0]
            t_dec = C.alternate({k: decode}, 1, 0)[k][0]
            if r >= args.warmup:
                pre[k].append(t_pre)
                dec[k].append(t_dec)
    tps = {k: NEW / C.median(v) for k, v in dec.items()}
    print(f"\nKV-cache decode (batch 1, prompt {PROMPT}, {NEW} new tokens), median of "
          f"{args.runs}:")
    for k in dec:
        print(f"  {k:7s} prefill {C.median(pre[k]) * 1000:6.1f} ms   decode "
              f"{C.median(dec[k]) * 1000 / NEW:6.2f} ms/token  {tps[k]:7.1f} tokens/s")
    print(f"  forgec / transformers: {tps['forgec'] / tps['hf']:.3f}× (decode tokens/s), "
          f"{C.median(pre['hf']) / C.median(pre['forgec']):.3f}× (prefill speed)")

    print("\npeak memory above the loaded model (fresh process per cell, peak RSS):")
    for phase in ("train", "decode"):
        mem = {k: memory(folder, k, phase, args.attn) for k in models}
        print(f"  {phase:6s} forgec {mem['forgec'] / 2**20:7.1f} MiB   transformers "
              f"{mem['hf'] / 2**20:7.1f} MiB   forgec / transformers "
              f"{mem['forgec'] / mem['hf']:.3f}×")


if __name__ == "__main__":
    main()
