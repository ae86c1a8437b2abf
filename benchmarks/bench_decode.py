"""Greedy decoding: the generated model, eager and with the static-shape compiled
decode step, against transformers — tokens/s at batch 1 and batch 8.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_decode.py [--runs 5] [--new 128] [--dir /tmp/fb]

The same model and weights as bench_hf.py (benchmarks/_common.py), fp32. Each
batch row holds a 64-token prompt; then `--new` tokens greedily:

* forgec eager: `runtime.generate.generate()` (KV cache, one forward per token);
* forgec static: `generate(..., compile=True)`: the prefill as above, then
  fixed-size caches and one compiled decode step (torch.compile, inductor; CUDA
  graphs on a GPU); the compilation happens in the warm-up runs;
* transformers: its forward with its own (growing) KV cache and greedy argmax in
  a plain Python loop (`generate()`'s own overhead left out);
* transformers static: the same loop over its `StaticCache`, the eager prefill,
  then its forward compiled once (torch.compile, inductor, fullgraph, static
  shapes; positions passed as a tensor, so no step recompiles) — transformers'
  own recipe for fast decoding, the fair "compiled" rival.

Each timed run is prefill + decode of all new tokens; tokens/s = batch × new /
the median time. All four run in one process, interleaved (the order rotates
every run). The greedy tokens of the four are compared and the result printed.

transformers loads its weights as views of the memory-mapped safetensors file; on
this machine the same matrix-vector products read such file-backed pages ~15 %
faster than freshly allocated memory (forgec's weights, and a copy of
transformers'). `--hf-weights-in-ram` gives transformers private copies, so that
both models read the same kind of memory and the code alone is compared.

On a loaded machine wall time measures the scheduler more than the code: then
`--threads 1 --cpu-time` times the CPU the process itself spent (one intra-op
thread, so no time is lost spinning at thread barriers either).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

PROMPT = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the process's CPU time instead of wall time (use with --threads 1)")
    p.add_argument("--hf-weights-in-ram", action="store_true",
                   help="give transformers private copies of its weights (as forgec's are), "
                   "instead of the views of the memory-mapped safetensors file it loads")
    p.add_argument("--dir", type=Path, help="where to keep the checkpoint and package "
                   "(default: a temporary folder)")
    args = p.parse_args()

    import torch
    import transformers

    from forgec.runtime.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    C.make_models_dir(folder)
    print(f"machine: {C.machine()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    forgec, hf = C.load_models(folder, "forgec").eval(), C.load_models(folder, "hf").eval()
    if args.hf_weights_in_ram:
        with torch.no_grad():
            for param in hf.parameters():
                param.data = param.data.clone()
    vocab, new = C.CONFIG["vocab_size"], args.new

    @torch.no_grad()
    def hf_greedy(ids: torch.Tensor) -> list[list[int]]:
        out = hf(input_ids=ids, use_cache=True)
        cache, x = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [x]
        for _ in range(new - 1):
            out = hf(input_ids=x, cache=cache, use_cache=True)
            cache, x = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(x)
        return torch.cat(tokens, dim=1).tolist()

    hf_step = torch.compile(hf, fullgraph=True, dynamic=False)

    @torch.no_grad()
    def hf_static_greedy(ids: torch.Tensor) -> list[list[int]]:
        batch, width = ids.shape
        cache = transformers.StaticCache(config=hf.config, max_cache_len=width + new - 1)
        out = hf(input_ids=ids, cache=cache, use_cache=True)
        x = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [x]
        for t in range(new - 1):
            positions = torch.full((batch, 1), width + t)
            out = hf_step(input_ids=x, cache=cache, use_cache=True, position_ids=positions)
            x = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(x)
        return torch.cat(tokens, dim=1).tolist()

    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(batch)
        ids = torch.randint(1, vocab, (batch, PROMPT))
        prompts = ids.tolist()
        fns = {
            "forgec eager": lambda p=prompts: generate(forgec, p, new, eos_id=None),
            "forgec static": lambda p=prompts: generate(forgec, p, new, eos_id=None,
                                                        compile=True),
            "transformers": lambda i=ids: hf_greedy(i),
            "transformers static": lambda i=ids: hf_static_greedy(i),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        outputs: dict[str, list[list[int]]] = {}
        t0 = time.perf_counter()
        for k, fn in fns.items():  # warm-up: the first static runs compile
            for _ in range(args.warmup):
                outputs[k] = fn()
        warm = time.perf_counter() - t0
        names = list(fns)
        for r in range(args.runs):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t = clock()
                fns[k]()
                times[k].append(clock() - t)
        tps = {k: batch * new / C.median(v) for k, v in times.items()}
        print(f"\nbatch {batch}, prompt {PROMPT}, {new} new tokens, median of {args.runs} "
              f"(warm-up incl. compilation {warm:.0f} s), {'CPU' if args.cpu_time else 'wall'} time:")
        for k, v in times.items():
            print(f"  {k:19s} {C.median(v) * 1000:8.0f} ms  {tps[k]:8.1f} tokens/s   runs: "
                  f"{', '.join(f'{t:.2f}' for t in v)} s")
        for k in ("forgec eager", "forgec static"):
            for rival in ("transformers", "transformers static"):
                print(f"  {k} / {rival}: {tps[k] / tps[rival]:.3f}×")
        print(f"  forgec static / forgec eager: {tps['forgec static'] / tps['forgec eager']:.3f}×")
        same = outputs["forgec static"] == outputs["forgec eager"]
        print(f"  greedy tokens: static == eager: {same}; forgec == transformers: "
              f"{outputs['forgec eager'] == outputs['transformers']}; transformers static == "
              f"transformers: {outputs['transformers static'] == outputs['transformers']}")


if __name__ == "__main__":
    main()
