"""benchmarks/gpu.py's --dry-run: the GPU benchmark's code (spec, package, the
runtime's step engine, compiled blocks, bf16 autocast, tokens/s and MFU) on the
CPU with a tiny spec, so that the script a GPU run needs is known to work."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_dry_run(gpu_bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("FORGEC_COMPILE_BACKEND", "eager")  # restored after the test
    result = gpu_bench.main(["--dry-run", "--out", str(tmp_path)])
    tiny = gpu_bench.TINY
    # the tiny spec's parameters: embedding (tied head) + per layer (2 norms, q/k/v/o,
    # SwiGLU's three matrices) + the final norm
    d, kv = tiny["dim"], tiny["dim"] // tiny["heads"] * tiny["kv_heads"]
    per_layer = 2 * d + 2 * d * d + 2 * d * kv + 3 * d * tiny["hidden"]
    params = tiny["vocab"] * d + tiny["layers"] * per_layer + d
    assert result["parameters"] == params
    assert result["model_flops_per_token"] == 6 * params + 12 * tiny["layers"] * d * 32
    assert result["compiled"] and result["processes"] == 1 and result["device"] == "cpu"
    assert result["tokens_per_s"] > 0 and result["peak_flops_per_device"] > 0
    assert result["mfu"] == pytest.approx(
        result["tokens_per_s"] * result["model_flops_per_token"] / result["peak_flops_per_device"])
    # random tokens: the loss of a fresh model is about ln(vocab)
    assert abs(result["last_loss"] - math.log(tiny["vocab"])) < 0.1
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out
    assert (tmp_path / "tiny_dry_run.forge").read_text().count("mesh(dp = 1)") == 1
