"""The gated_deltanet op (Qwen3-Next's linear attention): its chunked delta rule against
the recurrent one and transformers' own, the module against Qwen3NextGatedDeltaNet, and
its cache: decoding a chunk or a position at a time continues the full forward.

A whole Qwen3-Next (gated DeltaNet and gated attention layers, experts with a shared
expert) is compared with transformers in tests/test_parity_hf.py; the committed
specs/qwen3_next_debug.forge is built, decoded and trained in tests/test_qwen3_next.py.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from conftest import THREADS, codes, compile_text
from transformers.models.qwen3_next import modeling_qwen3_next as ref_mod

from forgec.compiler.cost import cost
from forgec.compiler.ops.gated_deltanet.modules import (
    DeltaNetCache,
    GatedDeltaNet,
    gated_delta_chunked,
    gated_delta_step,
    l2_normalize,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _inputs(b=2, s=19, h=4, dk=8, dv=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(b, s, h, dk, generator=g, dtype=dtype)) * dk**-0.5
    k = l2_normalize(torch.randn(b, s, h, dk, generator=g, dtype=dtype))
    v = torch.randn(b, s, h, dv, generator=g, dtype=dtype)
    decay = -torch.rand(b, s, h, generator=g, dtype=dtype)  # log decays ≤ 0
    beta = torch.rand(b, s, h, generator=g, dtype=dtype)
    state = torch.randn(b, h, dk, dv, generator=g, dtype=dtype)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("chunk", [1, 4, 8, 64])  # several chunks, padding, one chunk
def test_the_chunked_rule_equals_the_recurrent_one(chunk):
    q, k, v, decay, beta, state = _inputs()
    expected, expected_state = gated_delta_step(q, k, v, decay, beta, state)
    got, got_state = gated_delta_chunked(q, k, v, decay, beta, chunk, state)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_state, expected_state, rtol=0, atol=1e-12)


def test_the_rule_is_transformers_gated_delta_rule():
    q, k, v, decay, beta, state = _inputs(dtype=torch.float32)
    # transformers normalises q and k itself and scales q: give it the raw ones
    raw_q, raw_k = q * 3.0, k * 0.5
    expected, expected_state = ref_mod.torch_chunk_gated_delta_rule(
        raw_q, raw_k, v, g=decay, beta=beta, chunk_size=8, initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    got, got_state = gated_delta_chunked(
        l2_normalize(raw_q) * q.shape[-1] ** -0.5, l2_normalize(raw_k), v, decay, beta, 4, state)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_state, expected_state, rtol=0, atol=2e-6)


def _pair(seed=0):
    config = hf.Qwen3NextConfig(hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                                linear_key_head_dim=8, linear_value_head_dim=6,
                                linear_conv_kernel_dim=4, num_hidden_layers=1,
                                layer_types=["linear_attention"], rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    ref = ref_mod.Qwen3NextGatedDeltaNet(config, 0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.add_(0.2 * torch.randn_like(p))
    ours = GatedDeltaNet(32, qk_heads=2, v_heads=4, qk_head_dim=8, v_head_dim=6, conv=4,
                         chunk=4, norm_eps=1e-6)
    ours.load_state_dict(ref.state_dict())  # HF's names, HF's shapes
    return ref, ours.eval()


@torch.no_grad()
def test_the_module_equals_transformers_and_continues_from_its_cache():
    ref, ours = _pair()
    x = torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(1))
    expected = ref(x)  # of size ~10
    # transformers chunks by 64, the module by 4: the same sums, grouped otherwise
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-4)
    cache = DeltaNetCache(2, 13, 2, 4, 8, 6, 4)
    assert tuple(cache.conv_state.shape) == (2, 2 * 16 + 24, 3)
    assert tuple(cache.recurrent_state.shape) == (2, 4, 8, 6)
    # a prompt over several chunks, then a chunk of 3, then one position at a time
    parts = [ours(x[:, :6], cache), ours(x[:, 6:9], cache)]
    parts += [ours(x[:, t : t + 1], cache) for t in range(9, 13)]
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=0, atol=1e-4)
    assert cache.length == 13


def test_the_module_learns():
    _, ours = _pair()
    ours.train()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    ours(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


SPEC = """\
model tiny_delta {{
  dim = 64
  token_embedding = embedding(128, dim)
  block delta(x) {{
    norm  = rmsnorm(dim)
    mixer = gated_deltanet(dim, {args})
    return x + mixer(norm(x))
  }}
  layers      = stack(2) {{ default: delta }}
  norm        = rmsnorm(dim)
  output_head = lm_head(dim, 128)
}}
"""


def test_its_state_is_counted_per_sequence(tmp_path):
    comp, diags = compile_text(tmp_path, SPEC.format(
        args="qk_heads = 2, v_heads = 4, qk_head_dim = 16, v_head_dim = 8, chunk = 8"),
        name="tiny_delta.forge")
    assert comp is not None and diags.error_count == 0
    c = cost(comp.graphs["tiny_delta"])
    # per layer: the convolution's 3 last inputs of 2·32 + 32 channels, 4 heads of 16 × 8
    assert c.state_bytes_per_seq == 2 * (96 * 3 + 4 * 16 * 8) * 2  # bf16
    assert c.kv_bytes_per_token == 0


@pytest.mark.parametrize(("args", "code", "col"), [
    ("qk_heads = 4, v_heads = 6", "E175", 47),
    ("qk_heads = 2, conv = 1", "E160", 47),
])
def test_misuse_is_a_located_error(tmp_path, args, code, col):
    _, diags = compile_text(tmp_path, SPEC.format(args=args))
    assert codes(diags) == [(code, 6, col)]
