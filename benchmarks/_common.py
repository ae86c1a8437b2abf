"""Shared by the benchmarks: the benchmark model, timing, peak memory.

The model is a Llama-style decoder made with transformers (`LlamaConfig`
below), saved with `save_pretrained`, imported with `forgec import-hf`, built
and loaded with `runtime.hf.load_hf_checkpoint` — so the generated model and
the transformers model hold the very same weights.
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ~Llama-style, 8 layers of width 512: 35.7 M parameters (untied 8192-token head)
CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
              rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.02,
              tie_word_embeddings=False)
NAME = "bench_llama"


def make_models_dir(folder: Path, config: dict | None = None) -> Path:
    """Write the HF checkpoint and the generated package into `folder` (once);
    `config` replaces CONFIG (e.g. another vocabulary)."""
    import torch
    import transformers as hf

    from forgec.compiler.build import build
    from forgec.compiler.cli import main as forgec
    from forgec.compiler.driver import compile_spec

    ckpt = folder / "hf"
    if not (ckpt / "model.safetensors").exists():
        torch.manual_seed(0)
        hf.LlamaForCausalLM(hf.LlamaConfig(**(config or CONFIG))).save_pretrained(ckpt)
    spec = folder / f"{NAME}.forge"
    if not spec.exists():
        assert forgec(["import-hf", str(ckpt), "-o", str(spec)]) == 0
    build(compile_spec(str(spec)), str(folder / "pkg"), update=True)
    return folder


def load_models(folder: Path, which: str, attn: str = "sdpa"):
    """The transformers model (`which` = "hf") or the generated one ("forgec"), fp32."""
    import transformers as hf

    from forgec.runtime.hf import load_hf_checkpoint

    if which == "hf":
        return hf.LlamaForCausalLM.from_pretrained(folder / "hf", attn_implementation=attn,
                                                   dtype="float32")
    path = folder / "pkg" / NAME / "model.py"
    spec = importlib.util.spec_from_file_location(f"bench_{NAME}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return load_hf_checkpoint(module.Transformer(), folder / "hf")


def alternate(fns: dict[str, Callable[[], None]], runs: int, warmup: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time each function `warmup + runs` times, interleaved (ABAB…, then BABA… so
    neither always runs first); return the timed runs' seconds per name (by
    `clock`: wall time, or e.g. time.process_time)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = clock()
            fns[name]()
            elapsed = clock() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> int:
    """Reset the process's peak resident set (Linux: /proc/self/clear_refs 5); return RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status()["VmRSS"]


def peak_rss() -> int:
    return _status()["VmHWM"]


def machine() -> str:
    import platform

    import torch

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")
