"""Parity of multi-head latent attention and DeepSeek's mixture of experts with
`transformers`' DeepseekV3ForCausalLM: a tiny random model (fp32, eager attention)
saved with `save_pretrained`, its weights loaded into the package of
`specs/deepseek_debug.forge` (or a variant of it) by `load_hf_checkpoint`:

* logits within 1e-5 of transformers';
* 32 greedy tokens identical, forgec decoding with its latent cache;
* `save_hf_checkpoint` writes a folder transformers loads back to the same logits.

The config matches the spec: queries through a 32-wide bottleneck (q_lora_rank), a
16-wide key/value latent, 16 + 8 query/key channels per head (the 8 interleaved-RoPE
ones shared by the keys), 16 value channels; a dense first layer
(first_k_dense_replace = 1), then 8 experts in 4 groups, 2 per token from the 2 best
groups, sigmoid scores with a (random, non-zero) score-correction bias, normalised
weights times routed_scaling_factor 2.5, one shared expert. The `direct_q` variant
is DeepSeek-V2-Lite's attention: no query bottleneck, RoPE on the halves.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf

from forgec.compiler.build import build
from forgec.compiler.driver import compile_spec
from forgec.runtime.hf import load_hf_checkpoint, save_hf_checkpoint

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

# the V2-Lite-style variant: the debug spec with queries projected directly and RoPE on
# the halves of the rotated channels
LATENT_Q = "mla(dim, heads = n_heads, q_lora_rank = 32, kv_lora_rank = 16,"
DIRECT_Q = "mla(dim, heads = n_heads, rope_interleave = false, kv_lora_rank = 16,"
VARIANTS = {"latent_q": {}, "direct_q": dict(q_lora_rank=None, rope_interleave=False)}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _package(spec: Path, out: Path, name: str):
    build(compile_spec(str(spec)), str(out), update=True)
    path = out / name / "model.py"
    module_spec = importlib.util.spec_from_file_location(f"parity_{name}_{id(out)}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(HF model, forgec model with its weights, the HF folder)."""
    tmp = tmp_path_factory.mktemp(request.param)
    config = hf.DeepseekV3Config(**{**CONFIG, **VARIANTS[request.param]})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # a bias that changes which experts win
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    ref.save_pretrained(tmp / "hf")
    spec, name = ROOT / "specs" / "deepseek_debug.forge", "deepseek_debug"
    if request.param == "direct_q":
        spec, name = tmp / "deepseek_direct_q.forge", "deepseek_direct_q"
        text = (ROOT / "specs" / "deepseek_debug.forge").read_text()
        assert LATENT_Q in text
        spec.write_text(text.replace(LATENT_Q, DIRECT_Q)
                        .replace("model deepseek_debug", "model deepseek_direct_q"))
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = _package(spec, tmp / "pkg", name).Transformer().eval()
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


@torch.no_grad()
def test_greedy_decoding_with_the_latent_cache_matches_transformers(pair):
    ref, model, _ = pair
    prompt = _tokens(PROMPT, 1, seed=3)
    out = ref(prompt, use_cache=True)
    expected = []
    for _ in range(NEW):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        expected.append(int(nxt))
        out = ref(nxt, cache=out.cache, use_cache=True)
    assert len(set(expected)) >= 8, f"a degenerate reference decode proves little: {expected}"
    caches = model.make_kv_caches(1, PROMPT + NEW)
    # the cache holds the latent and the rotated shared key, not per-head keys and values
    assert caches[0].k.shape == (1, 1, PROMPT + NEW, CONFIG["kv_lora_rank"])
    assert caches[0].v.shape == (1, 1, PROMPT + NEW, CONFIG["qk_rope_head_dim"])
    x, got = prompt, []
    for _ in range(NEW):
        x = model(x, kv_caches=caches)[:, -1].argmax(-1, keepdim=True)
        got.append(int(x))
    assert got == expected


@torch.no_grad()
def test_save_hf_checkpoint_round_trip(pair):
    ref, model, tmp = pair
    out = tmp / "back"
    save_hf_checkpoint(model, out, config=tmp / "hf")
    back = hf.DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for key, t in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], t, rtol=0, atol=0, msg=key)
    ids = _tokens(16, 1, seed=4)
    torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=0, atol=0)


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


# ---- DeepSeek-V2-Lite: the same attention without the query bottleneck (its RoPE turns
# interleaved pairs as complex numbers: the same products as rope_interleave), softmax
# routing, greedy top-k, no renormalisation, routed_scaling_factor 1

V2_SPEC = (LATENT_Q, "mla(dim, heads = n_heads, kv_lora_rank = 16,",
           "router = sigmoid_topk(routed_scale = 2.5, n_group = 4, topk_group = 2)",
           "router = softmax_topk(renormalize = false)")


@pytest.fixture(scope="module")
def v2_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    config = hf.DeepseekV2Config(**{**CONFIG, "q_lora_rank": None, "topk_method": "greedy",
                                    "routed_scaling_factor": 1.0, "norm_topk_prob": False})
    for key in ("n_group", "topk_group"):  # unused by greedy routing
        setattr(config, key, None)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.DeepseekV2ForCausalLM(config).eval()
    ref.save_pretrained(tmp / "hf")
    text = (ROOT / "specs" / "deepseek_debug.forge").read_text()
    for old, new in (V2_SPEC[:2], V2_SPEC[2:]):
        assert old in text
        text = text.replace(old, new)
    spec = tmp / "deepseek_v2_lite.forge"
    spec.write_text(text.replace("model deepseek_debug", "model deepseek_v2_lite"))
    torch.manual_seed(1)
    model = _package(spec, tmp / "pkg", "deepseek_v2_lite").Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, tmp


@torch.no_grad()
def test_deepseek_v2_lite_logits_tokens_and_round_trip(v2_pair):
    ref, model, tmp = v2_pair
    ids = _tokens(PROMPT + NEW, 2, seed=2)
    torch.testing.assert_close(model(ids), ref(ids).logits, rtol=0, atol=1e-5)
    prompt = _tokens(PROMPT, 1, seed=3)
    out = ref(prompt, use_cache=True)
    expected = []
    for _ in range(NEW):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        expected.append(int(nxt))
        out = ref(nxt, cache=out.cache, use_cache=True)
    assert len(set(expected)) >= 8, expected
    caches = model.make_kv_caches(1, PROMPT + NEW)
    x, got = prompt, []
    for _ in range(NEW):
        x = model(x, kv_caches=caches)[:, -1].argmax(-1, keepdim=True)
        got.append(int(x))
    assert got == expected
    save_hf_checkpoint(model, tmp / "back", config=tmp / "hf")
    back = hf.DeepseekV2ForCausalLM.from_pretrained(tmp / "back", attn_implementation="eager")
    for key, t in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], t, rtol=0, atol=0, msg=key)
