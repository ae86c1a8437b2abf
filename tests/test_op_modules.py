"""The op modules (compiler/ops/*/modules.py) are real PyTorch: imported and checked
directly against torch references, and specialised by compiler/modular.py into
code without dead branches."""

from __future__ import annotations

import ast
import math

import pytest
import torch
import torch.nn.functional as F

from forgec.compiler.modular import copy_definitions, index, specialise
from forgec.compiler.ops import OPS
from forgec.compiler.ops.attention.modules import Attention, KVCache
from forgec.compiler.ops.embedding.modules import OutputHead, TokenEmbedding
from forgec.compiler.ops.mlp.modules import GeluMLP, ReluMLP, SwiGLU
from forgec.compiler.ops.moe import modules as moe_modules
from forgec.compiler.ops.moe.modules import ExpertsMeasured, MoE, SoftmaxTopK, grouped_mm
from forgec.compiler.ops.norm.modules import LayerNorm, RMSNorm
from forgec.compiler.ops.rope.modules import apply_rope, rope2d_tables


def _init(module, *args):
    torch.manual_seed(0)
    with torch.no_grad():
        module.init_weights(*args)
    return module


def test_norms_equal_the_textbook_formulas():
    x = torch.randn(2, 5, 16, dtype=torch.float64)  # the norms compute in fp32
    rms = _init(RMSNorm(16, 1e-6))
    with torch.no_grad():
        rms.weight.copy_(torch.linspace(0.5, 1.5, 16))
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight.double()
    torch.testing.assert_close(rms(x), ref, rtol=1e-6, atol=1e-6)
    ln = _init(LayerNorm(16, 1e-5, bias=True))
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True)
                                                      + 1e-5)
    torch.testing.assert_close(ln(x), ref, rtol=1e-6, atol=1e-6)


def test_mlps_equal_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)
    swiglu = _init(SwiGLU(8, 24), 0.02, 0.01)
    g, u, d = swiglu.gate_proj.weight, swiglu.up_proj.weight, swiglu.down_proj.weight
    torch.testing.assert_close(swiglu(x), (F.silu(x @ g.T) * (x @ u.T)) @ d.T)
    for cls, act in ((GeluMLP, F.gelu), (ReluMLP, F.relu)):
        mlp = _init(cls(8, 24, bias=True), 0.02, 0.01)
        up, down = mlp.up_proj, mlp.down_proj
        torch.testing.assert_close(mlp(x), act(x @ up.weight.T + up.bias) @ down.weight.T
                                   + down.bias)
        assert torch.equal(up.bias, torch.zeros(24))  # biases start at zero


def test_zero_init_starts_the_output_projection_at_zero():
    assert torch.equal(_init(SwiGLU(8, 24, zero_init=True), 0.02, 0.01).down_proj.weight,
                       torch.zeros(8, 24))
    att = _init(Attention(16, 4, 2, 4, True, False, False, zero_init=True), 0.02, 0.01)
    assert torch.equal(att.o_proj.weight, torch.zeros(16, 16))


def test_apply_rope_rotates_pairs_half_split_and_passes_the_rest():
    x = torch.randn(1, 3, 2, 8)
    angles = torch.randn(1, 3, 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    out = apply_rope(x, cos, sin)  # rotary_dim 4 of head_dim 8
    for i in range(2):  # channel i pairs with channel i + 2
        c, s = angles[..., i].cos()[..., None], angles[..., i].sin()[..., None]
        torch.testing.assert_close(out[..., i], (x[..., i] * c - x[..., i + 2] * s))
        torch.testing.assert_close(out[..., i + 2], (x[..., i + 2] * c + x[..., i] * s))
    assert torch.equal(out[..., 4:], x[..., 4:])


def _reference_attention(att, x, mask):
    b, s, _ = x.shape
    q = (x @ att.q_proj.weight.T).view(b, s, att.heads, att.head_dim).transpose(1, 2)
    k = (x @ att.k_proj.weight.T).view(b, s, att.kv_heads, att.head_dim).transpose(1, 2)
    v = (x @ att.v_proj.weight.T).view(b, s, att.kv_heads, att.head_dim).transpose(1, 2)
    rep = att.heads // att.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
    return out @ att.o_proj.weight.T


def test_rope2d_tables_turn_half_the_pairs_with_rows_and_half_with_columns():
    cos, sin = rope2d_tables(3, 8, 100.0)  # a 3×3 grid after a CLS token, head_dim 8
    assert cos.shape == sin.shape == (10, 8)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    inv_freq = 1.0 / (100.0 ** (torch.arange(2).float() / 2))
    row, col = 1, 2  # patch 5 (row-major): its first pairs turn with the row, then the column
    angles = torch.cat([row * inv_freq, col * inv_freq])
    torch.testing.assert_close(cos[1 + 5], torch.cat([angles, angles]).cos())
    torch.testing.assert_close(sin[1 + 5], torch.cat([angles, angles]).sin())


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_equals_a_hand_written_reference(causal):
    att = _init(Attention(16, 4, 2, 4, causal, False, False, use_rope=False), 0.2, 0.2)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(6, 6, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    out = att(x, None, None, None)
    torch.testing.assert_close(out, _reference_attention(att, x, mask))


def test_attention_with_a_cache_decodes_what_the_full_forward_computes():
    att = _init(Attention(16, 4, 2, 4, True, True, False, qk_norm_eps=1e-6), 0.2, 0.2)
    x = torch.randn(1, 5, 16)
    angles = torch.outer(torch.arange(5.0), torch.ones(2))
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None], torch.cat([angles.sin()] * 2, -1)[None]
    full = att(x, cos, sin, None)
    cache = KVCache(1, 8, 2, 4)
    first = att(x[:, :3], cos[:, :3], sin[:, :3], None, cache)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None, 3:]  # queries 3, 4
    last = att(x[:, 3:], cos[:, 3:], sin[:, 3:], causal, cache)
    torch.testing.assert_close(torch.cat([first, last], dim=1), full)


def test_one_expert_top1_moe_equals_its_swiglu():
    torch.manual_seed(0)
    router = SoftmaxTopK(8, 1, 1, True, 0.0, 0.0)
    moe = _init(MoE(8, 16, 1, 1, router), 0.2, 0.2)
    dense = SwiGLU(8, 16)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.experts.gate_proj[0].T)
        dense.up_proj.weight.copy_(moe.experts.up_proj[0].T)
        dense.down_proj.weight.copy_(moe.experts.down_proj[0].T)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(moe(x), dense(x))


def test_experts_measured_swaps_the_grouped_matmul_and_lifts_capacity_only_inside():
    router = SoftmaxTopK(8, 4, 2, True, 0.0, 0.0)
    moe = _init(MoE(8, 16, 4, 2, router, capacity_factor=0.5), 0.2, 0.2).train()
    calls = []

    def stand_in(x, w, counts):
        calls.append(int(counts.sum()))
        return x.new_zeros(x.shape[0], w.shape[-1])

    x = torch.randn(2, 6, 8)
    with ExpertsMeasured(moe, stand_in):
        assert moe_modules.grouped_mm is stand_in and moe.capacity_factor == 0.0
        out = moe(x)
    # every token reaches its top_k experts (no capacity), through the stand-in only
    assert calls == [2 * 6 * 2] * 3 and torch.count_nonzero(out) == 0
    assert moe_modules.grouped_mm is grouped_mm and moe.capacity_factor == 0.5
    assert torch.count_nonzero(moe(x)) > 0


@pytest.mark.parametrize("width", [8, 5])  # 5: rows not 16-byte aligned, the loop fallback
def test_grouped_mm_equals_one_matmul_per_expert(width):
    x, w = torch.randn(7, 4), torch.randn(3, 4, width)
    counts = torch.tensor([2, 0, 5])
    ref = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(grouped_mm(x, w, counts), ref)


def test_embedding_and_head_shapes():
    emb, head = _init(TokenEmbedding(10, 4), 0.02), _init(OutputHead(4, 10, bias=True), 0.02)
    assert head(emb(torch.tensor([[1, 2, 3]]))).shape == (1, 3, 10)


# ---- specialisation -------------------------------------------------------------------


def test_every_op_names_definitions_of_its_own_folder():
    defs = index()
    for name, op in OPS.items():
        for d in op.definitions:
            assert d in defs and defs[d].family == op.folder, (name, d)


@pytest.mark.parametrize("features", [frozenset(), frozenset({"qk_norm", "rope", "kv_cache"}),
                                      frozenset({"rope", "no_rope", "zero_init"})])
def test_specialised_code_has_no_flags_left_and_parses(features):
    flags = {"KV_CACHE", "QK_NORM", "ROPE", "NO_ROPE", "ZERO_INIT", "PARTIAL_ROTARY"}
    for source in copy_definitions(["Attention", "MoE", "mot_attention"], features):
        ast.parse(source)
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        assert not names & flags, names & flags
        assert "# if " not in source


def test_flags_keep_exactly_the_branches_the_features_ask_for():
    att = index()["Attention"]
    bare = specialise(att, frozenset())
    assert "apply_rope" not in bare and "q_norm" not in bare and "kv_cache" not in bare
    assert "use_rope" not in bare and "zero_init" not in bare
    rope = specialise(att, frozenset({"rope"}))
    assert "        q, k = apply_rope(" in rope and "use_rope" not in rope
    both = specialise(att, frozenset({"rope", "no_rope"}))
    assert "        if self.use_rope:\n            q, k = apply_rope(" in both
    zero = specialise(att, frozenset({"zero_init"}))
    assert "        if self.zero_init:\n            nn.init.zeros_" in zero
    assert "        else:\n" in zero


def test_definitions_come_after_what_they_use():
    sources = copy_definitions(["MoE"], frozenset({"shared"}))
    names = [ast.parse(s).body[-1] for s in sources]
    order = [getattr(n, "name", None) or n.targets[0].id for n in names]
    assert order.index("SwiGLU") < order.index("MoE")
    assert order.index("grouped_mm") < order.index("GroupedExperts") < order.index("MoE")
    assert order.index("GROUPED_MM") < order.index("grouped_mm")


def test_a_decided_branch_that_returns_takes_the_unreachable_code_after_it():
    """apply_rope returns early with partial rotary; OutputHead's fused and plain losses
    are alternatives. Each copy keeps one return path, and no statement after it."""
    partial = specialise(index()["apply_rope"], frozenset({"partial_rotary"}))
    assert partial.count("return") == 1 and "return torch.cat([out, x_pass]" in partial
    whole = specialise(index()["apply_rope"], frozenset())
    assert whole.count("return") == 1 and "x_pass" not in whole
    for features, kept, gone in ((frozenset({"fused_loss"}), "LinearCrossEntropy", "F.cross_"),
                                 (frozenset(), "F.cross_entropy", "LinearCrossEntropy")):
        head = specialise(index()["OutputHead"], features)
        assert kept in head and gone not in head
        for node in ast.walk(ast.parse(head)):  # no statement follows a return
            for field in ("body", "orelse"):
                block = getattr(node, field, None) or []
                for stmt in block[:-1]:
                    assert not isinstance(stmt, ast.Return), ast.unparse(node)[:80]


def test_an_annotation_union_does_not_copy_its_member():
    """Attention names DocumentMask only in its mask annotation and in the branches of
    the document_spans feature: without the feature the model has no DocumentMask, and
    the annotation does not name it; with it, both are there."""
    short = "\n".join(copy_definitions(["Attention"], frozenset({"rope"})))
    assert "DocumentMask" not in short
    assert "mask: torch.Tensor | None," in short
    long = "\n".join(copy_definitions(["Attention"], frozenset({"rope", "document_spans"})))
    assert "class DocumentMask" in long
    assert "mask: torch.Tensor | DocumentMask | None," in long
