"""`forgec plan` on the new layers: soft-capped attention and sliding windows
(gemma2_debug), multi-head latent attention and DeepSeek's experts
(deepseek_debug), Mamba mixers beside attention and experts (jamba_debug),
Mamba-2's chunked scan (mamba2_debug), and a short convolution beside attention
with sinks (a spec of this file). At a shape where activations dominate, the
single-process estimate is within 15 % of the peak of real training steps on
this CPU (a probe process each, run side by side).

What it takes: the forward's saved tensors are measured on the meta device
(attention whose keys and values differ in head dim runs SDPA's math path, as
the CPU does), and an op's backward workspace beyond them comes from its OpDef
(`backward_bytes`: Mamba's scan holds three (B, S, inner, state) fp32 gradients).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from forgec.compiler.build import build
from forgec.compiler.driver import compile_spec
from forgec.runtime.planner import plan_report

CONV_SINKS = """
model conv_sinks {
  vocab_size  = 256
  dim         = 64
  n_layers    = 2
  max_seq_len = 256

  token_embedding = embedding(vocab_size, dim)
  rope            = rope(head_dim = 16, max_seq_len = max_seq_len)

  block conv(x) {
    attention_norm = rmsnorm(dim)
    conv           = short_conv(dim, kernel = 3)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 128)
    h = x + conv(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }

  block attn(x) extends conv {
    attention = attention(dim, heads = 4, kv_heads = 2, rope = rope, sinks = true)
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }

  layers      = stack(n_layers) { default: conv  every 2 from 1: attn }
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, vocab_size)
}
"""

# (model, micro-batch, sequence length): activations are most of each peak
SHAPES = [("gemma2_debug", 4, 128), ("deepseek_debug", 8, 128), ("jamba_debug", 4, 128),
          ("mamba2_debug", 4, 128), ("conv_sinks", 4, 256)]
SINGLE = "\nplan single for {name} {{\n  mesh(dp = 1)\n}}\n"


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> dict[str, tuple[dict, int]]:
    """{model: (its estimate's row, the measured peak above the resident size before it)}."""
    tmp = tmp_path_factory.mktemp("plan_zoo")
    for name in ("gemma2_debug", "deepseek_debug", "jamba", "jamba_debug", "mamba2_debug"):
        shutil.copy(ROOT / "specs" / f"{name}.forge", tmp)
    (tmp / "conv_sinks.forge").write_text(CONV_SINKS)
    rows, probes = {}, {}
    # glibc serves every block of a page or more with its own mapping and returns it
    # when freed: the resident size follows the live tensors (a scan's many 32 KiB
    # states would otherwise leave the heap fragmented)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "4096",
           "OMP_NUM_THREADS": "1"}
    for name, batch, seq in SHAPES:
        spec = tmp / f"{name}.forge"
        with open(spec, "a", encoding="utf-8") as f:
            f.write(SINGLE.format(name=name))
        rows[name] = plan_report(str(spec), "single", 1, micro_batch=batch, seq_len=seq)
        pkg = build(compile_spec(str(spec)), str(tmp / "built"), update=True).package
        # a fresh process each (what one run frees, the next would reuse), all at once
        probes[name] = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "memory_probe.py"), pkg, str(batch),
             str(seq)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=ROOT)
    out = {}
    try:
        for name, proc in probes.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr
            out[name] = (rows[name]["per_rank"][0], json.loads(stdout)["delta"])
    finally:
        for proc in probes.values():
            if proc.poll() is None:
                proc.kill()
    return out


@pytest.mark.parametrize("name", [s[0] for s in SHAPES])
def test_estimate_within_15_percent_of_the_measured_peak(peaks, name):
    row, measured = peaks[name]
    estimate = row["total_bytes"]
    assert row["activation_bytes"] > row["param_bytes"] + row["optimizer_bytes"]
    report = (f"{name}: estimate {estimate / 2**20:.2f} MiB, measured "
              f"{measured / 2**20:.2f} MiB ({100 * (estimate - measured) / measured:+.1f} %)")
    print(report)
    assert abs(estimate - measured) <= 0.15 * measured, report
