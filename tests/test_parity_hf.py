"""Numerical parity with `transformers`: import → build → load → same logits, same tokens.

For each family a tiny random model is made from a config object (no download),
saved with `save_pretrained`, imported with `forgec import-hf`, built, and
filled by `runtime.hf.load_hf_checkpoint`. In fp32 and eval mode, with HF on
its eager attention:

* the logits of a random batch agree within 1e-5 (absolute);
* 32 greedily decoded tokens are identical — forgec decoding with its KV cache
  (`make_kv_caches`, `forward(..., kv_caches=...)`), HF with its own cache
  (`cache`), one token at a time.

The configs exercise what differs between the families: Llama 3 RoPE scaling
(with wavelengths in all three bands), q/k/v/o biases, a sliding window shorter
than the sequence (Mistral; Qwen2 on its upper layers only), q/k/v biases and a
tied head (Qwen2), qk-norm with head_dim ≠ dim / heads (Qwen3), softmax top-2
routing renormalised (Mixtral) and not (Qwen3-MoE, whose dense and sparse layers
are interleaved by mlp_only_layers).

Weights are drawn with std 0.15 (`initializer_range`): at HF's 0.02 a tiny random
model's greedy decode falls into a loop of one or two tokens, which would prove
little (the test requires 8 distinct tokens of 32). The logits are then of size
~5, and the two implementations' fp32 rounding differs by ~5e-6 (about 1e-6
relative: different but equivalent op orders — SDPA vs eager softmax, fused
rms_norm, packed vs per-expert matmuls); at std 0.2 it would reach 1.5e-5.
`test_a_wrong_weight_would_be_caught` shows 1e-5 is still tight enough to see a
1e-3 change of one norm weight.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf

from forgec.compiler.build import build
from forgec.compiler.cli import main as forgec
from forgec.compiler.driver import compile_spec
from forgec.runtime.hf import load_hf_checkpoint

PROMPT, NEW = 20, 32
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.15)  # see below

# name: (config class, model class, extra config)
FAMILIES = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(
        # head_dim 16, theta 5e5: wavelengths 6.3 (kept), 32 (blended), 168+ (slowed)
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "llama_bias": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(attention_bias=True)),
    "mistral": (hf.MistralConfig, hf.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2,
        tie_word_embeddings=True)),
    "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM, dict(head_dim=24, rms_norm_eps=1e-5)),
    "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (hf.Qwen3MoeConfig, hf.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
        head_dim=24, norm_topk_prob=False, mlp_only_layers=[0, 2])),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _import_module(pkg: Path, name: str):
    path = pkg / name / "model.py"
    spec = importlib.util.spec_from_file_location(f"parity_{name}_{id(pkg)}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(HF model, forgec model with the same weights, the written spec's text)."""
    name = request.param
    config_cls, model_cls, extra = FAMILIES[name]
    tmp = tmp_path_factory.mktemp(name)
    config = config_cls(**{**BASE, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = model_cls(config).eval()
    assert ref.config._attn_implementation == "eager"
    ref.save_pretrained(tmp / "hf")
    spec = tmp / f"{name}.forge"
    assert forgec(["import-hf", str(tmp / "hf"), "-o", str(spec)]) == 0
    build(compile_spec(str(spec)), str(tmp / "pkg"), update=True)
    torch.manual_seed(1)  # forgec's own init differs: every weight must come from the file
    model = _import_module(tmp / "pkg", name).Transformer().eval()
    load_hf_checkpoint(model, tmp / "hf")
    return ref, model, spec.read_text()


def _tokens(n: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, BASE["vocab_size"], (batch, n), generator=g)


@torch.no_grad()
def test_logits_match_transformers(pair):
    ref, model, _ = pair
    ids = _tokens(PROMPT + NEW, 2, seed=2)  # longer than every sliding window
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
    ref, model, _ = pair
    prompt = _tokens(PROMPT, 1, seed=3)
    expected = _greedy_hf(ref, prompt, NEW)
    assert len(set(expected)) >= 8, f"a degenerate reference decode proves little: {expected}"
    assert _greedy_forgec(model, prompt, NEW) == expected


def test_the_spec_says_where_it_came_from(pair):
    _, _, text = pair
    assert "imported by `forgec import-hf`" in text
    assert "hidden_size" in text and "num_hidden_layers" in text  # fields named in comments


def test_a_wrong_weight_would_be_caught(pair):
    # the comparison is sensitive: one perturbed norm weight moves the logits past 1e-5
    ref, model, _ = pair
    ids = _tokens(16, 1, seed=4)
    with torch.no_grad():
        w = model.layers["1"].attention_norm.weight
        w.add_(1e-3)
        try:
            diff = (model(ids) - ref(ids).logits).abs().max().item()
        finally:
            w.sub_(1e-3)
    assert diff > 1e-5


def test_static_compiled_decoding_matches_transformers(pair, monkeypatch, request):
    """`generate(..., compile=True)` — fixed-size caches, one compiled decode step —
    gives transformers' greedy tokens too (traced with aot_eager here, cheap;
    tests/test_generate.py runs the inductor path against forgec's eager decode)."""
    from forgec.runtime.generate import generate
    from forgec.runtime.parallel import COMPILE_BACKEND_ENV

    ref, model, _ = pair
    if getattr(ref.config, "sliding_window", None) and getattr(ref.config, "use_sliding_window",
                                                                True):
        # the static cache keeps the step's token in a slot after all `size` history
        # slots, and the generated sliding-window masks measure distance in slots
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="known bug: compile=True decodes sliding-window attention wrongly"))
    prompt = _tokens(PROMPT, 1, seed=3)
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    try:
        got = generate(model, prompt.tolist(), NEW, eos_id=None, compile=True)[0]
    finally:
        torch._dynamo.reset()
    assert got == _greedy_hf(ref, prompt, NEW)
