"""The training step of the generated DeepSeek-style (MLA + routed experts) and
Jamba-style (Mamba + attention + experts) models against transformers on the same
weights, in one run.

Run by hand (not a test):

    .venv/bin/python benchmarks/bench_zoo_train.py [--dir /tmp/forgec-zoo] [--runs 5] [--warmup 2]

Each model is made with transformers' own config class (seed 0, sizes below),
saved with `save_pretrained`, imported with `forgec import-hf`, built, and loaded
with `runtime.hf.load_hf_checkpoint`: both sides hold the same fp32 weights.
One step, as in benchmarks/bench_train.py:

* forgec: what `forgec train` runs (runtime.loop.LocalEngine.step): forward
  with the fused head + cross-entropy, backward, grad-norm clipping to 1.0,
  fused AdamW, zero_grad; one document per row;
* transformers: what its Trainer runs: `model(input_ids, labels=...)`,
  backward, clip_grad_norm_(1.0), fused AdamW, zero_grad. Jamba runs its
  PyTorch path (`use_mamba_kernels=False`: the CUDA kernels need a GPU).

Both models of a family and both families run in this process, interleaved
round by round (the order reversed every other round); the median of `--runs`
is reported, and each ratio is of two medians of this run. `--profile` adds
torch.profiler's top operators (self CPU time) of one step of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BATCH, SEQ = 2, 256
VOCAB = 4096

# transformers class names and config fields: a small DeepSeek-V3 (MLA with a query
# bottleneck, 1 dense layer then 8 routed experts, 2 per token in 2 of 4 groups, and a
# shared one) and a small Jamba (Mamba layers, attention on layer 2, experts on odd
# layers)
FAMILIES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        max_position_embeddings=1024, tie_word_embeddings=False)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=16, use_mamba_kernels=False,
        max_position_embeddings=1024, tie_word_embeddings=False)),
}


def make_family(folder: Path, family: str) -> Path:
    """The HF checkpoint and the generated package of `family` under folder/family (once)."""
    import torch
    import transformers as hf

    from forgec.compiler.build import build
    from forgec.compiler.cli import main as forgec
    from forgec.compiler.driver import compile_spec

    config_cls, model_cls, fields = FAMILIES[family]
    out = folder / family
    ckpt = out / "hf"
    if not (ckpt / "model.safetensors").exists():
        torch.manual_seed(0)
        model = getattr(hf, model_cls)(getattr(hf, config_cls)(**fields))
        model.save_pretrained(ckpt)
    spec = out / f"bench_{family}.forge"
    if not spec.exists():
        assert forgec(["import-hf", str(ckpt), "-o", str(spec)]) == 0
    build(compile_spec(str(spec)), str(out / "pkg"), update=True)
    return out


def load(out: Path, family: str, which: str):
    import importlib.util

    import transformers as hf

    from forgec.runtime.hf import load_hf_checkpoint

    if which == "hf":
        return getattr(hf, FAMILIES[family][1]).from_pretrained(
            out / "hf", attn_implementation="sdpa", dtype="float32")
    path = out / "pkg" / f"bench_{family}" / "model.py"
    spec = importlib.util.spec_from_file_location(f"bench_{family}_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return load_hf_checkpoint(module.Transformer(), out / "hf")


def forgec_step(model, batch):
    """One step of forgec's single-process engine, as bench_train.py's, with a schedule
    (the routers' bias update reads its length)."""
    from bench_train import loaded_task

    from forgec.runtime.loop import LocalEngine
    from forgec.runtime.train import resolve_settings

    s = resolve_settings({"lr": 1e-4, "clip": 1.0, "steps": 1000}, None)
    engine = LocalEngine(loaded_task(model), s)
    state = {"step": 0}

    def step():
        state["step"] += 1
        engine.step(batch, state["step"])
    return step


def profile(name: str, step) -> None:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{name}: one step, top operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    from bench_train import hf_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dir", type=Path, help="where to keep the checkpoints and packages "
                   "(default: a temporary folder)")
    p.add_argument("--profile", action="store_true", help="profile one step of each")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated families (default: all)")
    args = p.parse_args()

    import tempfile

    import torch

    folder = args.dir or Path(tempfile.mkdtemp(prefix="forgec-zoo-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"machine: {C.machine()}")
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    batch = SimpleNamespace(inputs=ids[:, :-1], targets=ids[:, 1:],
                            doc_ids=torch.zeros(BATCH, SEQ, dtype=torch.long))
    fns = {}
    families = args.families.split(",")
    for family in families:
        out = make_family(folder, family)
        forgec_model = load(out, family, "forgec")
        n = sum(t.numel() for t in forgec_model.parameters())
        print(f"{family}: {n / 1e6:.2f} M parameters, fp32, batch {BATCH} × {SEQ}")
        fns[f"{family} forgec"] = forgec_step(forgec_model, batch)
        # as bench_train.py: transformers' labels are its inputs, shifted inside its loss
        fns[f"{family} transformers"] = hf_step(load(out, family, "hf"), False, ids[:, :-1])
    if args.profile:
        for name, fn in fns.items():
            profile(name, fn)
    times = C.alternate(fns, args.runs, args.warmup)
    med = {k: C.median(v) for k, v in times.items()}
    print(f"\nmedian of {args.runs} interleaved rounds after {args.warmup} warm-up rounds "
          f"({torch.get_num_threads()} threads):")
    for k, t in med.items():
        print(f"  {k:26s} {t * 1000:7.0f} ms/step {BATCH * SEQ / t:7.0f} tokens/s   runs: "
              f"{', '.join(f'{x:.2f}' for x in times[k])} s")
    print("forgec / transformers (tokens/s, this run):")
    for family in families:
        print(f"  {family}: {med[f'{family} transformers'] / med[f'{family} forgec']:.3f}×")


if __name__ == "__main__":
    main()
