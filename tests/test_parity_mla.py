"""DeepSeek-V3's committed example with transformers' weights: what the import-based
parity tests (tests/test_parity_hf.py, families deepseek_v3, deepseek_v3_direct_q and
deepseek_v2: logits within 1e-5, greedy tokens with the latent cache, round trips)
do not show.

A tiny random DeepseekV3ForCausalLM (fp32, eager attention) saved with
`save_pretrained` loads into the package of `specs/deepseek_debug.forge`: queries
through a 32-wide bottleneck, a 16-wide key/value latent, 16 + 8 query/key channels
per head, a dense first layer, then 8 experts in 4 groups, 2 per token, sigmoid scores
with a (random, non-zero) score-correction bias, one shared expert. The latent cache
holds the latent and the rotated shared key; the router's bias is read.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf
from conftest import THREADS

from forgec.compiler.build import build
from forgec.compiler.driver import compile_spec
from forgec.runtime.hf import load_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEW = 20, 32
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
              topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
              first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=128,
              rms_norm_eps=1e-6, initializer_range=0.15,  # see tests/test_parity_hf.py
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})



@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def _package(spec: Path, out: Path, name: str):
    build(compile_spec(str(spec)), str(out), update=True)
    path = out / name / "model.py"
    module_spec = importlib.util.spec_from_file_location(f"parity_{name}_{id(out)}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF model, forgec model with its weights, the HF folder)."""
    tmp = tmp_path_factory.mktemp("deepseek_debug")
    config = hf.DeepseekV3Config(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # a bias that changes which experts win
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    ref.save_pretrained(tmp / "hf")
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = _package(ROOT / "specs" / "deepseek_debug.forge", tmp / "pkg",
                     "deepseek_debug").Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, tmp


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (batch, n), generator=g)


@torch.no_grad()
def test_logits_match_transformers(pair):
    ref, model, _ = pair
    ids = _tokens(PROMPT + NEW, 2, seed=2)
    expected = ref(ids).logits
    got = model(ids)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_latent_cache_holds_the_latent_and_the_shared_key(pair):
    _, model, _ = pair
    caches = model.make_kv_caches(1, PROMPT + NEW)
    # not per-head keys and values: the latent and the rotated key all heads share
    assert caches[0].k.shape == (1, 1, PROMPT + NEW, CONFIG["kv_lora_rank"])
    assert caches[0].v.shape == (1, 1, PROMPT + NEW, CONFIG["qk_rope_head_dim"])


def test_a_wrong_router_bias_would_be_caught(pair):
    # the score-correction bias is read: moving it changes the chosen experts
    ref, model, _ = pair
    ids = _tokens(16, 1, seed=4)
    with torch.no_grad():
        bias = model.layers["1"].mlp.router.expert_bias
        saved = bias.clone()
        bias.copy_(-saved)
        try:
            diff = (model(ids) - ref(ids).logits).abs().max().item()
        finally:
            bias.copy_(saved)
    assert diff > 1e-3
