"""gpt-oss's clamp and sinks matter: what the import-based parity tests
(tests/test_parity_hf.py, family gpt_oss: logits within 1e-5, greedy tokens with the KV
cache, a save_hf_checkpoint round trip) do not show.

A tiny random GptOssForCausalLM saved with `save_pretrained` loads into a spec written
here like specs/gpt_oss_120b.forge (attention sinks, q/k/v/o biases, a window on every
other layer, a router with a bias, experts with biases whose SwiGLU is clamped:
gate ≤ limit, |up| ≤ limit, gate·σ(1.702·gate)·(up + 1)). swiglu_limit is 1.0 so that
the clamp changes values at this scale: lifting it, or moving the sinks, moves the
logits.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import transformers as hf
from conftest import THREADS

from forgec.compiler.build import build
from forgec.compiler.driver import compile_spec
from forgec.runtime.hf import load_hf_checkpoint

PROMPT, NEW = 20, 32
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
              num_experts_per_tok=2, sliding_window=8, max_position_embeddings=128,
              rms_norm_eps=1e-5, swiglu_limit=1.0, initializer_range=0.15,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

SPEC = """
model oss_tiny {
  vocab_size = 256
  dim        = 64
  rope       = rope(head_dim = 16, max_seq_len = 128, theta = 10000.0)
  token_embedding = embedding(vocab_size, dim)
  block full(x) {
    attention_norm = rmsnorm(dim, eps = 1e-5)
    attention      = attention(dim, heads = 4, kv_heads = 2, head_dim = 16, rope = rope,
                               qkv_bias = true, out_bias = true, sinks = true)
    mlp_norm       = rmsnorm(dim, eps = 1e-5)
    mlp            = moe(dim, experts = 4, top_k = 2, hidden = 32, bias = true,
                         swiglu_limit = 1.0, router = softmax_topk(bias = true))
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }
  block sliding(x) extends full {
    attention = attention(dim, heads = 4, kv_heads = 2, head_dim = 16, rope = rope,
                          qkv_bias = true, out_bias = true, sinks = true, window = 8)
  }
  layers = stack(2) { default: full  every 2 from 0: sliding }
  norm        = rmsnorm(dim, eps = 1e-5)
  output_head = lm_head(dim, vocab_size)
}
"""


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oss")
    config = hf.GptOssConfig(**CONFIG)
    config._attn_implementation = "eager"
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    ref = hf.GptOssForCausalLM(config).eval()
    ref.save_pretrained(tmp / "hf")
    spec = tmp / "oss_tiny.forge"
    spec.write_text(SPEC)
    build(compile_spec(str(spec)), str(tmp / "pkg"), update=True)
    module_spec = importlib.util.spec_from_file_location(
        f"parity_oss_{id(tmp)}", tmp / "pkg" / "oss_tiny" / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = module.Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, tmp


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (batch, n), generator=g)


@torch.no_grad()
def test_the_clamp_and_the_sinks_matter(pair):
    ref, model, _ = pair
    ids = _tokens(16, 1, seed=4)
    base = model(ids)
    experts = model.layers["0"].mlp.experts
    limit = experts.swiglu_limit
    experts.swiglu_limit = 100.0
    try:
        assert (model(ids) - base).abs().max() > 1e-3
    finally:
        experts.swiglu_limit = limit
    sinks = model.layers["1"].attention.sinks
    saved = sinks.clone()
    sinks.add_(1.0)
    try:
        assert (model(ids) - base).abs().max() > 1e-3
    finally:
        sinks.copy_(saved)
