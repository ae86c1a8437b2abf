"""The short_conv op (LFM2's gated causal convolution): the module against
transformers' Lfm2ShortConv, and a hybrid of it and attention that decodes with a
ConvCache per convolution layer exactly as its full forward computes."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import transformers as hf
from conftest import THREADS, codes, compile_text

from forgec.compiler.cost import cost
from forgec.compiler.emit import emit_package
from forgec.compiler.ops.short_conv.modules import ConvCache, ShortConv

SPEC = """\
model tiny_lfm {
  dim = 64
  token_embedding = embedding(128, dim)
  block conv(x) {
    attention_norm = rmsnorm(dim)
    conv           = short_conv(dim, kernel = 3)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 96)
    h = x + conv(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }
  block attn(x) {
    attention_norm = rmsnorm(dim)
    attention      = attention(dim, heads = 4)
    mlp_norm       = rmsnorm(dim)
    mlp            = swiglu(dim, hidden = 96)
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }
  layers = stack(3) {
    default: conv
    at 1:    attn
  }
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, 128)
}
"""


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@torch.no_grad()
def test_short_conv_equals_lfm2s_and_continues_from_its_cache():
    config = hf.Lfm2Config(hidden_size=32, conv_L_cache=3, conv_bias=True, num_hidden_layers=1,
                           layer_types=["conv"])
    torch.manual_seed(0)
    ref = hf.models.lfm2.modeling_lfm2.Lfm2ShortConv(config, 0).eval()
    for p in ref.parameters():
        p.normal_(0.0, 0.3)
    ours = ShortConv(32, kernel=3, bias=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 11, 32)
    full = ours(x)
    torch.testing.assert_close(full, ref(x), rtol=0, atol=1e-6)
    cache = ConvCache(2, 16, 32, 3)
    steps = [ours(x[:, :5], cache)] + [ours(x[:, t : t + 1], cache) for t in range(5, 11)]
    # outputs of size ~10: in_proj over 5 rows or 1 rounds differently (~5e-6)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)
    assert cache.length == 11 and tuple(cache.conv_state.shape) == (2, 32, 2)


def _load(tmp_path, files: dict[str, str]):
    pkg = tmp_path / "tiny_lfm"
    pkg.mkdir()
    for name, text in files.items():
        (pkg / name).write_text(text)
    spec = importlib.util.spec_from_file_location("tiny_lfm_model", pkg / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def test_a_convolution_hybrid_counts_its_state_and_decodes_like_its_forward(tmp_path):
    comp, diags = compile_text(tmp_path, SPEC, name="tiny_lfm.forge")
    assert comp is not None and diags.error_count == 0
    c = cost(comp.graphs["tiny_lfm"])
    conv = 3 * 64 * 64 + 64 * 3 + 64 * 64
    attention = 4 * 64 * 64
    assert c.params_total == 2 * 128 * 64 + 3 * (2 * 64 + 3 * 64 * 96) + 2 * conv \
        + attention + 64
    assert c.kv_bytes_per_token == 2 * 64 * 2  # the attention layer's keys and values (bf16)
    assert c.state_bytes_per_seq == 2 * 64 * 2 * 2  # two layers' last 2 inputs (bf16)
    files = emit_package(comp, "tiny_lfm")
    assert "class MambaCache" not in files["model.py"]  # only the mixers the spec uses
    model = _load(tmp_path, files).Transformer().eval()
    caches = model.make_kv_caches(2, 20)
    assert [type(x).__name__ for x in caches] == ["ConvCache", "KVCache", "ConvCache"]
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    steps = [model(ids[:, :8], kv_caches=caches)]
    steps += [model(ids[:, t : t + 1], kv_caches=caches) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_a_kernel_of_one_is_e160(tmp_path):
    _, diags = compile_text(tmp_path, SPEC.replace("kernel = 3", "kernel = 1"))
    assert codes(diags) == [("E160", 6, 38)]
