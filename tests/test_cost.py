"""compiler/cost.py: parameters, FLOPs, KV cache and training memory, checked by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import codes

from forgec.compiler.cost import cost, group_of
from forgec.compiler.driver import compile_spec
from forgec.compiler.ops import attended_keys

SPECS = Path(__file__).resolve().parent.parent / "specs"

# dim 64, 2 layers, GQA 4/2 (head_dim 16), qkv biases, qk-norm, SwiGLU 128, vocab 256.
SMALL = """\
model m {{
  dim = 64
  token_embedding = embedding(256, dim)
  block dense(x) {{
    attention_norm = rmsnorm(dim)
    attention = attention(dim, heads = 4, kv_heads = 2, qkv_bias = true, qk_norm = true{attn})
    mlp_norm = rmsnorm(dim)
    mlp = swiglu(dim, hidden = 128)
    h = x + attention(attention_norm(x))
    return h + mlp(mlp_norm(h))
  }}
  layers = stack(2) {{ default: dense }}
  norm = rmsnorm(dim)
  output_head = lm_head(dim, 256{head})
}}
"""

EMB = 256 * 64
ATTN = (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64  # q, k, v, o projections
        + 64 + 32 + 32  # q, k, v biases
        + 16 + 16)  # q_norm, k_norm
MLP = 3 * 64 * 128
LAYER = 64 + ATTN + 64 + MLP  # two norms
HEAD = 256 * 64


def small(forge, attn: str = "", head: str = ", tie = token_embedding"):
    result, diags = forge(SMALL.format(attn=attn, head=head))
    assert codes(diags) == [], diags.errors
    return result.graphs["m"]


# ---- parameters ------------------------------------------------------------------------------


def test_hand_computed_parameter_count_with_a_tied_head(forge):
    assert ATTN == 12448 and LAYER == 37152
    c = cost(small(forge), seq_len=8)
    # the tied head shares the embedding's table: counted once
    assert c.params_total == EMB + 2 * LAYER + 64 == 90752
    assert c.params_active == c.params_total
    assert c.n_layers == 2
    assert c.model == "m"


def test_untied_head_is_counted(forge):
    c = cost(small(forge, head=""), seq_len=8)
    assert c.params_total == EMB + 2 * LAYER + 64 + HEAD == 107136


def test_head_bias_and_attention_out_bias(forge):
    c = cost(small(forge, attn=", out_bias = true", head=", bias = true"), seq_len=8)
    assert c.params_total == EMB + 2 * (LAYER + 64) + 64 + HEAD + 256


def test_breakdown_groups_layers(forge):
    c = cost(small(forge), seq_len=8)
    assert c.breakdown == {
        "token_embedding": EMB,
        "layers.*.attention_norm": 2 * 64,
        "layers.*.attention": 2 * ATTN,
        "layers.*.mlp_norm": 2 * 64,
        "layers.*.mlp": 2 * MLP,
        "norm": 64,
    }
    assert sum(c.breakdown.values()) == c.params_total


@pytest.mark.parametrize("fqn, group", [
    ("layers.3.attention.q_proj.weight", "layers.*.attention"),
    ("layers.12.mlp.down_proj.weight", "layers.*.mlp"),
    ("extra_layers.0.n.weight", "extra_layers.*.n"),
    ("token_embedding.embedding.weight", "token_embedding"),
    ("output_head.proj.weight", "output_head"),
    ("norm.weight", "norm"),
])
def test_group_of(fqn, group):
    assert group_of(fqn) == group


@pytest.mark.parametrize("spec, params", [
    ("llama3_8b", 8_030_261_248),
    ("llama3_70b", 70_553_706_496),
])
def test_llama3_parameters(spec, params):
    c = cost(compile_spec(str(SPECS / f"{spec}.forge")).graphs[spec])
    assert c.params_total == c.params_active == params


def test_llama3_8b_breakdown_by_hand():
    c = cost(compile_spec(str(SPECS / "llama3_8b.forge")).graphs["llama3_8b"])
    assert c.breakdown == {
        "token_embedding": 128256 * 4096,
        "layers.*.attention_norm": 32 * 4096,
        "layers.*.attention": 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096),
        "layers.*.mlp_norm": 32 * 4096,
        "layers.*.mlp": 32 * 3 * 4096 * 14336,
        "norm": 4096,
        "output_head": 128256 * 4096,
    }


# ---- FLOPs ----------------------------------------------------------------------------------

ATTN_PROJ_FLOPS = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)
MLP_FLOPS = 2 * MLP
HEAD_FLOPS = 2 * 256 * 64  # the head's matmul is done even when its weight is tied


def attention_flops(keys: float) -> float:
    # QK^T and attention·V: 2 FLOPs per multiply-add, heads · head_dim each, per key
    return ATTN_PROJ_FLOPS + 4 * 4 * 16 * keys


def test_flops_per_token_causal(forge):
    c = cost(small(forge), seq_len=8)
    keys = (8 + 1) / 2  # a causal query sees 1..S keys: (S+1)/2 on average
    assert c.flops_per_token == 2 * (attention_flops(keys) + MLP_FLOPS) + HEAD_FLOPS == 182528
    assert c.seq_len == 8


def test_flops_grow_with_the_sequence(forge):
    g = small(forge)
    at_2048 = cost(g, seq_len=2048).flops_per_token
    assert at_2048 == 2 * (attention_flops(2049 / 2) + MLP_FLOPS) + HEAD_FLOPS
    assert at_2048 - cost(g, seq_len=8).flops_per_token == 2 * 256 * (2049 - 9) / 2


def test_flops_sliding_window(forge):
    g = small(forge, attn=", window = 4")
    # S = 8, window 4: queries 0..3 see 1..4 keys, queries 4..7 see 4 keys
    keys = (1 + 2 + 3 + 4 + 4 * 4) / 8
    assert keys == 3.25 == attended_keys(8, True, 4)
    assert cost(g, seq_len=8).flops_per_token == 2 * (attention_flops(keys) + MLP_FLOPS) + HEAD_FLOPS
    # a window as long as the sequence is full causal attention
    assert cost(g, seq_len=4).flops_per_token == \
        cost(small(forge), seq_len=4).flops_per_token


def test_flops_non_causal(forge):
    full = small(forge, attn=", causal = false")
    assert cost(full, seq_len=8).flops_per_token == \
        2 * (attention_flops(8) + MLP_FLOPS) + HEAD_FLOPS
    windowed = small(forge, attn=", causal = false, window = 4")
    assert cost(windowed, seq_len=8).flops_per_token == \
        2 * (attention_flops(4) + MLP_FLOPS) + HEAD_FLOPS


@pytest.mark.parametrize("seq_len, causal, window, keys", [
    (1, True, 0, 1.0),
    (8, True, 0, 4.5),
    (8, True, 8, 4.5),
    (8, True, 100, 4.5),
    (8, True, 1, 1.0),
    (10, True, 2, (1 + 2 + 8 * 2) / 10),
    (8, False, 0, 8.0),
    (8, False, 3, 3.0),
    (8, False, 100, 8.0),
])
def test_attended_keys(seq_len, causal, window, keys):
    assert attended_keys(seq_len, causal, window) == pytest.approx(keys)


def test_llama3_8b_flops_by_hand():
    c = cost(compile_spec(str(SPECS / "llama3_8b.forge")).graphs["llama3_8b"])
    assert c.seq_len == 8192  # the model's max_seq_len
    per_layer = (2 * (2 * 4096 * 4096 + 2 * 1024 * 4096)  # projections
                 + 4 * 32 * 128 * 8193 / 2  # scores and values, causal
                 + 2 * 3 * 4096 * 14336)  # SwiGLU
    assert c.flops_per_token == 32 * per_layer + 2 * 128256 * 4096 == 17_157_062_656


def test_llama3_70b_flops_by_hand():
    c = cost(compile_spec(str(SPECS / "llama3_70b.forge")).graphs["llama3_70b"])
    per_layer = (2 * (2 * 8192 * 8192 + 2 * 1024 * 8192)
                 + 4 * 64 * 128 * 8193 / 2
                 + 2 * 3 * 8192 * 28672)
    assert c.flops_per_token == 80 * per_layer + 2 * 128256 * 8192 == 149_742_157_824


def test_default_sequence_length(forge):
    # no max_seq_len parameter and no rope: 2048
    assert cost(small(forge)).seq_len == 2048
    # a rope's max_seq_len
    result, diags = forge(SMALL.format(attn=", rope = r", head="").replace(
        "  dim = 64\n", "  dim = 64\n  r = rope(head_dim = 16, max_seq_len = 512)\n"))
    assert codes(diags) == []
    assert cost(result.graphs["m"]).seq_len == 512
    # a max_seq_len parameter wins
    result, diags = forge(SMALL.format(attn="", head="").replace(
        "  dim = 64\n", "  dim = 64\n  max_seq_len = 128\n"))
    assert codes(diags) == []
    assert cost(result.graphs["m"]).seq_len == 128


# ---- KV cache and memory ------------------------------------------------------------------


def test_kv_bytes_per_token(forge):
    g = small(forge)
    # 2 (k and v) · kv_heads · head_dim · layers · bytes
    assert cost(g, seq_len=8).kv_bytes_per_token == 2 * 2 * 16 * 2 * 2 == 256
    assert cost(g, seq_len=8).kv_dtype == "bf16"
    assert cost(g, seq_len=8, kv_dtype="fp32").kv_bytes_per_token == 512
    assert cost(g, seq_len=8, kv_dtype="fp8").kv_bytes_per_token == 128
    # independent of the sequence length and of the window
    assert cost(g, seq_len=4096).kv_bytes_per_token == 256
    assert cost(small(forge, attn=", window = 4"), seq_len=8).kv_bytes_per_token == 256


def test_non_causal_model_has_no_kv_cache(forge):
    c = cost(small(forge, attn=", causal = false"), seq_len=8)
    assert c.supports_kv_cache is False
    assert c.kv_bytes_per_token == 0
    assert c.non_causal == ["layers.0.attention", "layers.1.attention"]


@pytest.mark.parametrize("spec, kv", [
    ("llama3_8b", 2 * 8 * 128 * 32 * 2),
    ("llama3_70b", 2 * 8 * 128 * 80 * 2),
    ("llama_debug", 2 * 2 * 32 * 4 * 2),
])
def test_llama_kv_bytes(spec, kv):
    c = cost(compile_spec(str(SPECS / f"{spec}.forge")).graphs[spec])
    assert c.kv_bytes_per_token == kv
    assert c.supports_kv_cache is True
    assert c.non_causal == []


def test_training_memory(forge):
    c = cost(small(forge), seq_len=8)
    p = c.params_total
    assert c.training_memory == {
        "fp32": {"weights": 4 * p, "grads": 4 * p, "optimizer": 8 * p, "total": 16 * p},
        "bf16": {"weights": 2 * p, "grads": 2 * p, "optimizer": 4 * p, "total": 8 * p},
    }


def test_llama3_8b_training_memory():
    c = cost(compile_spec(str(SPECS / "llama3_8b.forge")).graphs["llama3_8b"])
    assert c.training_memory["fp32"]["total"] == 16 * 8_030_261_248
    assert c.training_memory["bf16"]["total"] == 8 * 8_030_261_248


def test_to_json(forge):
    c = cost(small(forge), seq_len=8)
    j = c.to_json()
    assert set(j) == {"model", "n_layers", "params_total", "params_active", "flops_per_token",
                      "seq_len", "kv_bytes_per_token", "kv_dtype", "supports_kv_cache",
                      "non_causal", "breakdown", "training_memory", "state_bytes_per_seq"}
    assert (j["params_total"], j["flops_per_token"], j["kv_bytes_per_token"]) == (
        90752, 182528, 256)
    assert j["state_bytes_per_seq"] == 0  # attention only: no recurrent state
