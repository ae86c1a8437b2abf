"""Training throughput and MFU of a 1B-class spec on GPU: bf16 autocast, every
block compiled, the fused head + cross-entropy, fused AdamW.

Run by hand (not a test):

    python benchmarks/gpu.py                                        # one GPU
    torchrun --standalone --nproc-per-node=$(nvidia-smi -L | wc -l) benchmarks/gpu.py   # FSDP
    python benchmarks/gpu.py --dry-run                              # CPU, tiny spec, seconds

The spec (written into --out, default a temporary folder) has Llama 3.2 1B's
geometry: width 2048, 16 layers, 32 heads over 8 KV heads, SwiGLU 8192,
vocabulary 128,256, head tied to the embedding: 1.24 B parameters. Its one plan,
`fsdp`, is FSDP2 over every process of the launch (`mesh(dp = WORLD)`).

The step is forgec's own, not a loop written here: one process runs
runtime.loop.LocalEngine (what `forgec train --bf16 --compile` runs), a
torchrun launch runs runtime.distributed.Engine with the plan (what `forgec
train --plan fsdp --bf16 --compile` runs on each rank): forward with the fused
loss, backward, grad-norm clipping, AdamW. The batches are random tokens, one
document per row (throughput does not depend on the text). `--warmup` steps
(compilation included) are not timed; then `--steps` steps are, as a whole,
after a device synchronisation.

MFU = achieved model FLOP/s ÷ (peak bf16 FLOP/s × processes). Model FLOPs per
token = 6 × parameters (the head is tied to the embedding, so the table is
counted once, as the head's matmul) + 12 × layers × width × sequence
(attention's score and value matmuls, forward and backward, without halving
for causality: the PaLM / torchtitan convention). The peak is the dense bf16
figure of the device's data sheet (PEAK_BF16 below, by device name), else
measured here with a large bf16 matmul, else given with --peak-tflops.

--dry-run: the same code on the CPU with a tiny spec (width 64, 2 layers),
compiled with the "eager" backend (the compile path without inductor's build
time) and a peak measured with a 512² fp32 matmul; a few seconds. The suite
runs it (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# dense bf16 tensor-core peak, FLOP/s, from the vendors' data sheets (without sparsity);
# the first name contained in torch.cuda.get_device_name() wins
PEAK_BF16 = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)

SPEC = """\
# {what}
model {name} {{
  vocab_size  = {vocab}
  dim         = {dim}
  n_layers    = {layers}
  n_heads     = {heads}
  n_kv_heads  = {kv_heads}
  max_seq_len = {max_seq}
  norm_eps    = 1e-5

  token_embedding = embedding(vocab_size, dim)
  rope            = rope(head_dim = dim / n_heads, max_seq_len = max_seq_len, theta = 500000.0)

  block dense(x) {{
    attention_norm = rmsnorm(dim, eps = norm_eps)
    attention      = attention(dim, heads = n_heads, kv_heads = n_kv_heads, rope = rope)
    mlp_norm       = rmsnorm(dim, eps = norm_eps)
    mlp            = swiglu(dim, hidden = {hidden})

    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }}

  layers      = stack(n_layers) {{ default: dense }}
  norm        = rmsnorm(dim, eps = norm_eps)
  output_head = lm_head(dim, vocab_size, tie = token_embedding)
}}

plan fsdp for {name} {{   # FSDP2 over every process of the launch
  mesh(dp = {world})
  fsdp(compute = {compute})
}}
"""

LLAMA_1B = dict(name="llama_1b", what="Llama 3.2 1B geometry, tied head: 1.24 B parameters",
                vocab=128256, dim=2048, layers=16, heads=32, kv_heads=8, hidden=8192,
                max_seq=8192)
TINY = dict(name="tiny_dry_run", what="a tiny model for --dry-run", vocab=256, dim=64,
            layers=2, heads=4, kv_heads=2, hidden=128, max_seq=256)


def write_spec(folder: Path, geometry: dict, world: int, compute: str) -> Path:
    path = folder / f"{geometry['name']}.forge"
    path.write_text(SPEC.format(**geometry, world=world, compute=compute), encoding="utf-8")
    return path


def flops_per_token(model, geometry: dict, seq: int) -> float:
    """6 × the parameters of the matmuls + 12 × layers × width × sequence. The
    embedding lookup does no matmul; the head, tied to it, does: so with a tied
    head every parameter counts."""
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * geometry["layers"] * geometry["dim"] * seq


def peak_flops(device, given_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    import torch

    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16:
            if key in name:
                return peak, f"data sheet, dense bf16 ({name})"
        return measured_matmul(device, torch.bfloat16, 8192), f"measured 8192² bf16 matmul ({name})"
    return measured_matmul(device, torch.float32, 512), "measured 512² fp32 matmul (CPU)"


def measured_matmul(device, dtype, n: int, repeat: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(generator, vocab: int, batch: int, seq: int):
    """A batch as runtime.data makes them (inputs, targets, doc_ids), random tokens."""
    import torch

    ids = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    return SimpleNamespace(inputs=ids[:, :-1], targets=ids[:, 1:],
                           doc_ids=torch.zeros(batch, seq, dtype=torch.long))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, help="sequences per step, over all processes "
                   "(default 8 per process; --dry-run 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; --dry-run 32)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; --dry-run 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compilation included "
                   "(default 5; --dry-run 1)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak (default: by name, "
                   "else measured)")
    p.add_argument("--no-compile", action="store_true", help="eager blocks (for comparison)")
    p.add_argument("--out", type=Path, help="folder for the spec and package (default: temporary)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny spec, a few seconds")
    args = p.parse_args(argv)

    import torch

    from forgec.runtime import parallel
    from forgec.runtime.loop import LocalEngine, TextTask
    from forgec.runtime.package import build_package, import_package
    from forgec.runtime.train import Settings

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dry = args.dry_run
    geometry = TINY if dry else LLAMA_1B
    batch = args.batch or (2 if dry else 8 * world)
    seq = args.seq or (32 if dry else 2048)
    steps = args.steps or (2 if dry else 20)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    if batch % world:
        p.error(f"--batch {batch} is not a multiple of the {world} processes")
    if not dry and not torch.cuda.is_available():
        p.error("no GPU visible (torch.cuda.is_available() is False); --dry-run runs on the CPU")
    if dry:
        os.environ[parallel.COMPILE_BACKEND_ENV] = "eager"

    out = args.out or Path(tempfile.mkdtemp(prefix="forgec-gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = write_spec(out, geometry, world, "fp32" if dry else "bf16")
    settings = Settings(steps=warmup + steps, batch_size=batch, seq_len=seq, lr=1e-4,
                        warmup=0, min_lr=1e-4, schedule_steps=warmup + steps, bf16=True,
                        compile=not args.no_compile)
    task = None
    if world == 1:  # one process: forgec train's LocalEngine
        device = torch.device("cuda" if not dry else "cpu")
        pkg = import_package(build_package(str(spec), str(out)))
        task = TextTask(pkg)
        with torch.device(device):
            engine = LocalEngine(task, settings)
        how = "one process (runtime.loop.LocalEngine)"
    else:  # a rank of a torchrun launch: forgec train --plan fsdp's Engine
        from forgec.runtime import distributed as D

        D._init_group()
        pkg_dir = D._build_once(str(spec), str(out), False, rank, None)
        pkg = import_package(pkg_dir)
        planmod = D.plan_module(pkg)
        layout = D.setup(D.check_plan(planmod, "fsdp", str(spec), None))
        device = layout.device
        task = TextTask(pkg)
        engine = D.Engine(pkg, planmod, "fsdp", layout, settings, fresh=True, task=task)
        how = f"FSDP2 over {world} processes (runtime.distributed.Engine)"
    n_params = engine.parameters_total()
    with torch.device("meta"):
        per_token = flops_per_token(task.new_model(), geometry, seq)

    generator = torch.Generator().manual_seed(0)
    step_times = []
    for step in range(1, warmup + steps + 1):
        batch_of_step = random_batch(generator, geometry["vocab"], batch, seq)
        sync(device)
        start = time.perf_counter()
        loss, _, _ = engine.step(batch_of_step, step)  # float(loss): the step has finished
        step_times.append(time.perf_counter() - start)
    timed = sum(step_times[warmup:])
    tokens_per_s = batch * seq * steps / timed
    peak, source = peak_flops(device, args.peak_tflops)
    mfu = tokens_per_s * per_token / (peak * world)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "processes": world, "parameters": n_params, "batch": batch, "seq": seq,
              "steps": steps, "compiled": settings.compile, "tokens_per_s": tokens_per_s,
              "tokens_per_s_per_device": tokens_per_s / world, "model_flops_per_token": per_token,
              "peak_flops_per_device": peak, "peak_source": source, "mfu": mfu,
              "last_loss": loss, "warmup_s": sum(step_times[:warmup])}
    if rank == 0:
        print(f"{geometry['what']} ({n_params:,} parameters), {how}, bf16 autocast, "
              f"{'compiled per block' if settings.compile else 'eager'}, batch {batch} × {seq}, "
              f"{steps} timed steps after {warmup} (warm-up {result['warmup_s']:.1f} s) on "
              f"{result['device']}")
        print(f"tokens/s {tokens_per_s:,.0f} ({tokens_per_s / world:,.0f} per device); "
              f"MFU {mfu:.1%} (peak {peak / 1e12:,.4g} TFLOP/s per device: {source}); "
              f"loss {loss:.4f}")
        print(json.dumps(result))
    if world > 1:
        D.teardown()
    return result


if __name__ == "__main__":
    main()
