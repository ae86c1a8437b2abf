"""Gemma, Gemma 2 and Gemma 3 (text) written in the language, against transformers.

Each family is a hand-written spec (below) of the size of a tiny random model made
from transformers' own config class (no download), filled with the model's
`save_pretrained` weights by `runtime.hf.load_hf_checkpoint`. In fp32 and eval
mode, HF on its eager attention:

* the logits agree within 1e-5 (absolute);
* 32 greedily decoded tokens are identical, forgec decoding with its KV cache
  (the sliding layers' windows shorter than prompt + answer);
* `save_hf_checkpoint` writes a folder transformers loads back to the same logits.

What the specs exercise: RMSNorm scaling by 1 + weight (`unit_offset`), the
embedding multiplied by sqrt(dim) in the table's dtype (`embedding(scale = ...)`),
an attention scale other than 1/sqrt(head_dim) (`attention(scale = ...)`), GeGLU
written as a module of the spec, sandwich norms; Gemma 2's soft-capped attention
scores and logits (`attention(softcap)`, `lm_head(softcap)`) and alternating
sliding / global layers; Gemma 3's per-head qk-norm with unit offset and a second
rope with its own base for the local layers, 5 local : 1 global (`every 6: global`).

Weights are drawn with std 0.15 (`initializer_range`), as in tests/test_parity_hf.py:
a tiny model at 0.02 decodes one repeated token, which would prove little. For the
same reason the head is not tied to the embedding (Gemma's default): tied, the
sqrt(dim)-scaled embedding of the last token dominates a tiny random model's
residual stream, and greedy decoding repeats it (a tied head is `lm_head(tie = ...)`,
tested with Qwen2 in tests/test_parity_hf.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as hf

from forgec.compiler.build import build
from forgec.compiler.driver import compile_spec
from forgec.compiler.ops.attention.modules import Attention, DocumentMask
from forgec.compiler.ops.embedding.modules import OutputHead
from forgec.runtime.hf import load_hf_checkpoint, save_hf_checkpoint

PROMPT, NEW = 20, 32
VOCAB, DIM, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 128, 64, 96, 4, 2, 16, 8
BASE = dict(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=2,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
            max_position_embeddings=128, initializer_range=0.15, tie_word_embeddings=False)

# The parts every Gemma shares: the GeGLU MLP as a module, norms scaling by 1 + w,
# the embedding multiplied by sqrt(dim).
COMMON = """
  vocab    = 128
  dim      = 64
  hidden   = 96
  n_heads  = 4
  kv_heads = 2
  head_dim = 16
  eps      = 1e-6
  token_embedding = embedding(vocab, dim, scale = sqrt(dim))
  module geglu_mlp(x) {
    gate_proj = linear(dim, hidden)
    up_proj   = linear(dim, hidden)
    down_proj = linear(hidden, dim)
    return down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))
  }
  norm = rmsnorm(dim, eps, unit_offset = true)
"""

GEMMA = """
model gemma {""" + COMMON + """
  rope = rope(head_dim = head_dim, max_seq_len = 128, theta = 10000.0)
  block dense(x) {
    attention_norm = rmsnorm(dim, eps, unit_offset = true)
    attention      = attention(dim, heads = n_heads, kv_heads = kv_heads,
                               head_dim = head_dim, rope = rope)
    mlp_norm       = rmsnorm(dim, eps, unit_offset = true)
    mlp            = geglu_mlp()
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }
  layers      = stack(2) { default: dense }
  output_head = lm_head(dim, vocab)
}
"""

GEMMA2 = """
model gemma2 {""" + COMMON + """
  query_pre_attn_scalar = 24
  rope = rope(head_dim = head_dim, max_seq_len = 128, theta = 10000.0)
  block local(x) {
    attention_norm      = rmsnorm(dim, eps, unit_offset = true)
    attention           = attention(dim, heads = n_heads, kv_heads = kv_heads,
                                    head_dim = head_dim, rope = rope, window = 8,
                                    scale = 1 / sqrt(query_pre_attn_scalar), softcap = 50.0)
    post_attention_norm = rmsnorm(dim, eps, unit_offset = true)
    mlp_norm            = rmsnorm(dim, eps, unit_offset = true)
    mlp                 = geglu_mlp()
    post_mlp_norm       = rmsnorm(dim, eps, unit_offset = true)
    h = x + post_attention_norm(attention(attention_norm(x)))
    return h + post_mlp_norm(mlp(mlp_norm(h)))
  }
  block global(x) extends local {
    attention = attention(dim, heads = n_heads, kv_heads = kv_heads, head_dim = head_dim,
                          rope = rope, scale = 1 / sqrt(query_pre_attn_scalar), softcap = 50.0)
  }
  layers      = stack(4) { default: local  every 2: global }
  output_head = lm_head(dim, vocab, softcap = 30.0)
}
"""

GEMMA3 = """
model gemma3 {""" + COMMON + """
  query_pre_attn_scalar = 24
  # global layers turn with base 1e6, the local ones with 1e4
  rope = rope(head_dim = head_dim, max_seq_len = 128, theta = 1000000.0, local_theta = 10000.0)
  block local(x) {
    attention_norm      = rmsnorm(dim, eps, unit_offset = true)
    attention           = attention(dim, heads = n_heads, kv_heads = kv_heads,
                                    head_dim = head_dim, rope = rope, local_rope = true,
                                    window = 8, scale = 1 / sqrt(query_pre_attn_scalar),
                                    qk_norm = true, qk_norm_eps = eps,
                                    qk_norm_unit_offset = true)
    post_attention_norm = rmsnorm(dim, eps, unit_offset = true)
    mlp_norm            = rmsnorm(dim, eps, unit_offset = true)
    mlp                 = geglu_mlp()
    post_mlp_norm       = rmsnorm(dim, eps, unit_offset = true)
    h = x + post_attention_norm(attention(attention_norm(x)))
    return h + post_mlp_norm(mlp(mlp_norm(h)))
  }
  block global(x) extends local {
    attention = attention(dim, heads = n_heads, kv_heads = kv_heads, head_dim = head_dim,
                          rope = rope, scale = 1 / sqrt(query_pre_attn_scalar),
                          qk_norm = true, qk_norm_eps = eps, qk_norm_unit_offset = true)
  }
  layers      = stack(6) { default: local  every 6: global }   # 5 local : 1 global
  output_head = lm_head(dim, vocab)
}
"""

# name: (config class, model class, extra config, spec)
FAMILIES = {
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM, {}, GEMMA),
    "gemma2": (hf.Gemma2Config, hf.Gemma2ForCausalLM, dict(
        num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0), GEMMA2),
    # transformers' defaults: layer_types 5 sliding : 1 full, rope bases 1e4 (sliding)
    # and 1e6 (full)
    "gemma3": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM, dict(
        num_hidden_layers=6, sliding_window=WINDOW, query_pre_attn_scalar=24), GEMMA3),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _import_model(pkg: Path, name: str):
    path = pkg / name / "model.py"
    spec = importlib.util.spec_from_file_location(f"gemma_{name}_{id(pkg)}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(HF model, forgec model with the same weights, HF config, the tmp folder)."""
    name = request.param
    config_cls, model_cls, extra, text = FAMILIES[name]
    tmp = tmp_path_factory.mktemp(name)
    config = config_cls(**{**BASE, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = model_cls(config).eval()
    ref.save_pretrained(tmp / "hf")
    spec = tmp / f"{name}.forge"
    spec.write_text(text)
    build(compile_spec(str(spec)), str(tmp / "pkg"), update=True)
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = _import_model(tmp / "pkg", name).Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, config, tmp


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


@torch.no_grad()
def test_logits_match_transformers(pair):
    ref, model, _, _ = pair
    ids = _tokens(PROMPT + NEW, 2, seed=2)  # longer than the sliding window
    expected = ref(ids).logits
    got = model(ids)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def _greedy_hf(ref, prompt: torch.Tensor, n: int) -> list[int]:
    out = ref(prompt, use_cache=True)
    tokens = []
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        out = ref(nxt, cache=out.cache, use_cache=True)
    return tokens


@torch.no_grad()
def _greedy_forgec(model, prompt: torch.Tensor, n: int) -> list[int]:
    caches = model.make_kv_caches(1, prompt.shape[1] + n)
    x, tokens = prompt, []
    for _ in range(n):
        x = model(x, kv_caches=caches)[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(x))
    return tokens


def test_greedy_decoding_with_kv_cache_matches_transformers(pair):
    ref, model, _, _ = pair
    prompt = _tokens(PROMPT, 1, seed=3)
    expected = _greedy_hf(ref, prompt, NEW)
    assert len(set(expected)) >= 8, f"a degenerate reference decode proves little: {expected}"
    assert _greedy_forgec(model, prompt, NEW) == expected


@torch.no_grad()
def test_save_hf_checkpoint_loads_back_into_transformers(pair):
    ref, model, config, tmp = pair
    save_hf_checkpoint(model, tmp / "back", config=config)
    back = type(ref).from_pretrained(tmp / "back", attn_implementation="eager").eval()
    ids = _tokens(24, 1, seed=5)
    torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_a_wrong_weight_would_be_caught(pair):
    # one element of a norm weight moved by 1e-3 moves the logits past 1e-5 (the
    # final norm's: a layer's input norm moved as a whole is undone by the norms that
    # follow it, Gemma 3's qk-norms and post-norms)
    ref, model, _, _ = pair
    ids = _tokens(16, 1, seed=4)
    with torch.no_grad():
        w = model.norm.weight
        w[0] += 1e-3
        try:
            diff = (model(ids) - ref(ids).logits).abs().max().item()
        finally:
            w[0] -= 1e-3
    assert diff > 1e-5


# ---- the new paths of the op modules, on their own --------------------------------------


def test_softcapped_fused_loss_equals_autograd_through_the_cap():
    torch.manual_seed(0)
    head = OutputHead(16, 40, softcap=3.0)
    head.init_weights(0.5)
    x = torch.randn(2, 7, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 7))
    targets[0, 2] = -100  # not trained on
    loss = head(x, targets)
    gx, gw = torch.autograd.grad(loss, (x, head.proj.weight))
    logits = head(x)
    assert logits.abs().max() < 3.0  # capped
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    rx, rw = torch.autograd.grad(ref, (x, head.proj.weight))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_soft_capped_attention_refuses_packed_documents():
    attn = Attention(16, 2, softcap=5.0, use_rope=False)
    attn.init_weights(0.02, 0.02)
    x = torch.randn(1, 6, 16)
    mask = DocumentMask(torch.tensor([[0, 0, 0, 1, 1, 1]]), flex=False)
    with pytest.raises(ValueError, match="packed documents"):
        attn(x, None, None, mask)


# ---- the committed example, specs/gemma2_debug.forge ------------------------------------


def _gemma2_debug(seed: int = 0):
    torch.manual_seed(seed)
    return importlib.import_module("generated.gemma2_debug.model").Transformer()


def test_gemma2_debug_decodes_with_the_cache_as_the_full_forward():
    model = _gemma2_debug().eval()
    x = torch.randint(0, 256, (2, 76), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # 76 tokens: past the 64-token window of the local layers
        full = model(x)
        caches = model.make_kv_caches(2, 80)
        steps = [model(x[:, :60], kv_caches=caches)]
        steps += [model(x[:, t : t + 1], kv_caches=caches) for t in range(60, 76)]
    assert full.abs().max() < 30.0  # the soft-capped logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_gemma2_debug_trains():
    model = _gemma2_debug().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(4):
        loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1, losses
