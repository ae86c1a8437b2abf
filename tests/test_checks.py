"""compiler/checks/: each validation pass on a passing and a failing spec."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT, codes

from forgec.compiler.checks import modality, run_vlm_checks
from forgec.compiler.cost import vlm_cost
from forgec.compiler.diagnostics import Diagnostics
from forgec.compiler.driver import compile_spec
from forgec.compiler.lower import ADAPTER, FUSION, TEXT_PREFIX, VISION_PREFIX, lower_vlm

# A model whose block `dense` is written by the test, from line 6 on.
CHECK_MODEL = """\
model m {{
  dim = 64
  token_embedding = embedding(256, dim)
  {rope}
{block}
  layers = stack({n}) {{ default: dense }}
  norm = rmsnorm({width})
  output_head = lm_head({width}, 256)
}}
"""


ROPE = "rope = rope(head_dim = 16, max_seq_len = 32)"


def check(forge, *lines: str, n: int = 2, width: str = "dim", rope: str = ROPE):
    """Compile a model whose block is `block dense(x) {` + lines (line 6 on) + `}`;
    `rope` is the model's line 4."""
    body = "  block dense(x) {\n" + "".join(f"    {ln}\n" for ln in lines) + "  }"
    return forge(CHECK_MODEL.format(block=body, n=n, width=width, rope=rope))


def attention(forge, args: str, *more: str):
    """A block applying `attn = attention(<args>)` (declared on line 6, column 12)."""
    return check(forge, f"attn = attention({args})", *more, "return x + attn(x)")


# ---- heads: E070 / E071 --------------------------------------------------------------------


def test_heads_that_divide_the_width_pass(forge):
    result, diags = attention(forge, "dim, heads = 4, kv_heads = 2")
    assert codes(diags) == []
    args = result.models["m"].blocks["dense"].components["attn"].args
    assert (args["head_dim"], args["kv_heads"]) == (16, 2)


def test_width_not_divisible_by_heads_is_E070_at_heads(forge):
    _, diags = attention(forge, "dim, heads = 5")
    assert codes(diags) == [("E070", 6, 27)]
    d = diags.errors[0]
    assert d.message == "dim 64 is not divisible by heads 5"
    assert d.hint == "set head_dim explicitly, or use heads = 4"


def test_E070_with_positional_heads(forge):
    _, diags = attention(forge, "dim, 6")
    assert codes(diags) == [("E070", 6, 27)]
    assert diags.errors[0].hint == "set head_dim explicitly, or use heads = 4"


def test_explicit_head_dim_makes_uneven_heads_legal(forge):
    result, diags = attention(forge, "dim, heads = 5, head_dim = 16")
    assert codes(diags) == []
    attn = result.graphs["m"].nodes["layers.0.attn"]
    assert attn["weights"]["layers.0.attn.q_proj.weight"] == (80, 64)
    assert attn["weights"]["layers.0.attn.o_proj.weight"] == (64, 80)
    assert attn["shape"] == ("B", "S", 64)


def test_heads_not_a_multiple_of_kv_heads_is_E071_at_kv_heads(forge):
    _, diags = attention(forge, "dim, heads = 4, kv_heads = 3")
    assert codes(diags) == [("E071", 6, 38)]
    assert diags.errors[0].message == "heads 4 is not a multiple of kv_heads 3"
    assert diags.errors[0].hint == "each KV head serves an equal group of query heads"


def test_both_head_errors_at_once(forge):
    _, diags = attention(forge, "dim, heads = 6, kv_heads = 4")
    assert codes(diags) == [("E070", 6, 27), ("E071", 6, 38)]


# ---- rotary: E072 / E075 / E076 -------------------------------------------------------------


def test_matching_rope_passes(forge):
    _, diags = attention(forge, "dim, heads = 4, rope = rope")
    assert codes(diags, None) == []


def rope_attention(forge, rope_args: str, attn_args: str = "dim, heads = 4"):
    return check(forge, f"attn = attention({attn_args}, rope = rope)", "return x + attn(x)",
                 rope=f"rope = rope({rope_args})")


def test_partial_rotary_passes(forge):
    result, diags = rope_attention(forge, "head_dim = 16, max_seq_len = 8, rotary_dim = 8")
    assert codes(diags, None) == []
    assert result.models["m"].components["rope"].args["rotary_dim"] == 8


def test_odd_rotary_dim_is_E072(forge):
    _, diags = rope_attention(forge, "head_dim = 16, max_seq_len = 8, rotary_dim = 7")
    assert codes(diags) == [("E072", 4, 47)]
    assert diags.errors[0].message == "rotary dimension 7 is odd; RoPE rotates channel pairs"


def test_odd_head_dim_as_rotary_dim_is_E072_at_head_dim(forge):
    _, diags = rope_attention(forge, "head_dim = 15, max_seq_len = 8",
                              "dim, heads = 4, head_dim = 15")
    assert codes(diags) == [("E072", 4, 15)]


def test_rope_in_a_block_is_checked_too(forge):
    _, diags = check(forge, "r = rope(head_dim = 16, max_seq_len = 8, rotary_dim = 7)",
                     "attn = attention(dim, heads = 4, rope = r)", "return x + attn(x)",
                     rope="n_heads = 4")
    assert codes(diags) == [("E072", 6, 46)]


def test_rope_built_for_another_head_dim_is_E075_at_the_rope_argument(forge):
    _, diags = attention(forge, "dim, heads = 8, rope = rope")
    assert codes(diags) == [("E075", 6, 38)]
    d = diags.errors[0]
    assert d.message == "rope 'rope' is built for head_dim 16 but this attention has head_dim 8"
    assert [(m, s.line, s.col) for m, s in d.notes] == [("rope declared here", 4, 10)]


def test_rotary_dim_wider_than_the_head_is_E076(forge):
    _, diags = rope_attention(forge, "head_dim = 16, max_seq_len = 8, rotary_dim = 32")
    assert codes(diags) == [("E076", 4, 47)]
    assert diags.errors[0].message == "rotary_dim 32 exceeds head_dim 16"


def test_a_second_rope_is_E077_at_its_name(forge):
    _, diags = check(forge, "r = rope(head_dim = 16, max_seq_len = 8)",
                     "attn = attention(dim, heads = 4, rope = r)", "return x + attn(x)")
    assert codes(diags) == [("E077", 6, 5)]
    d = diags.errors[0]
    assert d.message == "a model has one rope; 'r' is a second"
    assert [(m, s.line, s.col) for m, s in d.notes] == [("the first is here", 4, 3)]


# ---- positive sizes: E073 ------------------------------------------------------------------


def test_non_positive_sizes_are_E073_at_the_argument(forge):
    _, diags = check(forge, "a1 = attention(dim, heads = 4, kv_heads = 0)",
                     "a2 = attention(0, heads = 4)",
                     "a3 = attention(dim, heads = -4)",
                     "m1 = swiglu(dim, hidden = 0)",
                     "return x + a1(x) + a2(x) + a3(x) + m1(x)")
    assert codes(diags) == [("E073", 6, 36), ("E073", 7, 20), ("E073", 8, 25), ("E073", 9, 22)]
    assert [d.message for d in diags.errors] == [
        "'kv_heads' of attention must be positive, got 0",
        "'dim' of attention must be positive, got 0",
        "'heads' of attention must be positive, got -4",
        "'hidden' of swiglu must be positive, got 0",
    ]


def test_positive_sizes_pass(forge):
    _, diags = check(forge, "d = swiglu(dim, hidden = 1)", "return x + d(x)")
    assert codes(diags) == []


# ---- shapes: E051 / E052 / E057 / E058 ------------------------------------------------------


def test_adding_tensors_of_different_widths_is_E051_at_the_add(forge):
    _, diags = check(forge, "proj = linear(dim, 32)", "return x + proj(x)")
    assert codes(diags) == [("E051", 7, 12)]
    assert diags.errors[0].message == "cannot add (B, S, 64) and (B, S, 32)"


def test_linear_round_trip_passes(forge):
    result, diags = check(forge, "up = linear(dim, 32)", "down = linear(32, dim)",
                          "return x + down(up(x))")
    assert codes(diags) == []
    assert result.graphs["m"].nodes["layers.0.up"]["shape"] == ("B", "S", 32)


def test_op_input_of_the_wrong_width_is_E052_at_the_application(forge):
    _, diags = check(forge, "proj = linear(dim, 32)", "n = rmsnorm(dim)",
                     "return x + n(proj(x))")
    assert codes(diags) == [("E052", 8, 16)]
    d = diags.errors[0]
    assert d.message == "'n' (rmsnorm) expects (B, S, 64) but receives (B, S, 32)"
    assert [(m, s.line, s.col) for m, s in d.notes] == [("n declared here", 7, 9)]


def test_wrong_arity_is_E057(forge):
    _, diags = check(forge, "n = rmsnorm(dim)", "return x + n(x, x)")
    assert codes(diags) == [("E057", 7, 16)]
    assert diags.errors[0].message == "'n' (rmsnorm) takes 1 input, got 2"


def test_no_inputs_is_E057_too(forge):
    _, diags = check(forge, "n = rmsnorm(dim)", "return x + n()")
    assert codes(diags) == [("E057", 7, 16)]
    assert diags.errors[0].message == "'n' (rmsnorm) takes 1 input, got 0"


def test_block_returning_another_width_is_E058(forge):
    # one layer, and a final norm/head of the new width: the block output is the only fault
    _, diags = check(forge, "proj = linear(dim, 32)", "return proj(x)", n=1, width="32")
    assert codes(diags) == [("E058", 7, 12)]
    assert diags.errors[0].message == ("block 'dense' returns (B, S, 32) but a stacked block must "
                                       "return the hidden shape (B, S, 64)")


# ---- dangling: E054 ---------------------------------------------------------------------------


def test_unused_value_is_E054(forge):
    _, diags = check(forge, "n = rmsnorm(dim)", "h = n(x)", "g = x + h", "return x + n(x)")
    # h is used by g, but g is used by nothing
    assert codes(diags) == [("E054", 8, 9)]
    assert diags.errors[0].message == "the result of this value is never used"
    assert diags.errors[0].hint == "use it, return it, or remove it"


def test_unused_application_is_E054_naming_the_component(forge):
    _, diags = check(forge, "n = rmsnorm(dim)", "h = n(x)", "return x")
    assert codes(diags) == [("E054", 7, 9)]
    assert diags.errors[0].message == "the result of 'n' is never used"


def test_every_value_used_passes(forge):
    _, diags = check(forge, "n = rmsnorm(dim)", "h = n(x)", "return x + h")
    assert codes(diags, None) == []


# ---- tied: E074 -------------------------------------------------------------------------------

TIED = """\
model m {{
  dim = 64
  token_embedding = embedding(256, dim)
  block dense(x) {{
    n1 = rmsnorm(dim)
    return x + n1(x)
  }}
  layers = stack(2) {{ default: dense }}
  norm = rmsnorm(dim)
  output_head = {head}
}}
"""


def test_tied_head_of_the_embedding_shape_passes(forge):
    result, diags = forge(TIED.format(head="lm_head(dim, 256, tie = token_embedding)"))
    assert codes(diags, None) == []
    head = result.graphs["m"].nodes["output_head"]
    assert head["weights"] == {}
    assert head["tied"] == {"output_head.proj.weight": "token_embedding.embedding.weight"}


def test_tied_head_of_another_shape_is_E074(forge):
    _, diags = forge(TIED.format(head="lm_head(dim, 512, tie = token_embedding)"))
    assert codes(diags) == [("E074", 10, 35)]
    d = diags.errors[0]
    assert d.message == ("'output_head' (512 × 64) cannot share the weight of 'token_embedding' "
                         "(256 × 64)")
    assert [(m, s.line, s.col) for m, s in d.notes] == [("embedding declared here", 3, 21)]


def test_tied_head_with_a_bias_is_E074_at_the_bias(forge):
    _, diags = forge(TIED.format(head="lm_head(dim, 256, bias = true, tie = token_embedding)"))
    assert codes(diags) == [("E074", 10, 35)]
    assert diags.errors[0].message == "a tied head cannot have a bias of its own"


def test_tie_to_something_other_than_an_embedding_is_E025(forge):
    _, diags = forge(TIED.format(head="lm_head(dim, 256, tie = norm)"))
    assert codes(diags) == [("E025", 10, 41)]
    assert diags.errors[0].message == ("argument 'tie' of lm_head() expects an embedding "
                                       "component, got the rmsnorm component 'norm'")


# ---- causality: N001 ------------------------------------------------------------------------


def test_all_causal_model_supports_a_kv_cache(forge):
    result, diags = attention(forge, "dim, heads = 4")
    assert codes(diags, None) == []
    g = result.graphs["m"]
    assert g.graph["supports_kv_cache"] is True
    assert g.graph["non_causal"] == []


def test_non_causal_attention_makes_the_model_training_only(forge):
    result, diags = attention(forge, "dim, heads = 4, causal = false")
    assert codes(diags) == []  # a note, not an error
    assert codes(diags, "note") == [("N001", 6, 12)]  # at the op
    d = diags.items[0]
    assert d.severity == "note"
    assert d.message == ("model 'm' is training-only: attention 'layers.0.attn' is not causal "
                         "(and 1 more), so it cannot decode with a KV cache")
    g = result.graphs["m"]
    assert g.graph["supports_kv_cache"] is False
    assert [fqn for fqn, _ in g.graph["non_causal"]] == ["layers.0.attn", "layers.1.attn"]


def test_one_non_causal_op_among_causal_ones(forge):
    result, diags = check(forge, "causal = attention(dim, heads = 4)",
                          "bidir = attention(dim, heads = 4, causal = false)",
                          "return x + causal(x) + bidir(x)", n=1)
    assert codes(diags, None) == [("N001", 7, 13)]
    assert diags.items[0].message == ("model 'm' is training-only: attention 'layers.0.bidir' is "
                                      "not causal, so it cannot decode with a KV cache")
    assert result.graphs["m"].graph["supports_kv_cache"] is False


# ---- checks and binding errors together ----------------------------------------------------


def test_checks_still_report_when_binding_failed(forge):
    _, diags = check(forge, "attn = attention(dim, heads = 5)",
                     "n = rmsnorm(dim, eps = 2.0)",
                     "return x + attn(x) + zz(x)",
                     rope="rope = rope(head_dim = 16, max_seq_len = 8, rotary_dim = 7)")
    # E026 and E021 come from binding; E072 and E070 from checks in the same run
    assert codes(diags) == [("E072", 4, 47), ("E070", 6, 27), ("E026", 7, 28), ("E021", 8, 26)]


def test_structural_checks_are_skipped_when_binding_failed(forge):
    _, diags = check(forge, "proj = linear(dim, 32)", "n = rmsnorm(dim)",
                     "h = n(x)",  # dangling (E054) ...
                     "return x + proj(x) + zz(x)")  # ... and E051, once binding is clean
    assert codes(diags) == [("E021", 9, 26)]
    _, diags = check(forge, "proj = linear(dim, 32)", "n = rmsnorm(dim)", "h = n(x)",
                     "return x + proj(x)")
    assert codes(diags) == [("E054", 8, 9), ("E051", 9, 12)]


# ---- names: E059 ------------------------------------------------------------------------------


def test_ordinary_names_pass(forge):
    _, diags = check(forge, "n1 = rmsnorm(dim)", "hidden = n1(x)", "return x + hidden")
    assert codes(diags, None) == []


def test_names_unsafe_in_generated_code_are_E059(forge):
    _, diags = forge("""\
        model m {
          dim = 64
          token_embedding = embedding(256, dim)
          block dense(x) {
            forward = rmsnorm(dim)
            torch = rmsnorm(dim)
            lambda_ = rmsnorm(dim)
            h = forward(x) + torch(x) + lambda_(x)
            return x + h
          }
          block pair(x, self) {
            return x + self
          }
          block my_block(x) {
            return x
          }
          block myBlock(x) {
            return x
          }
          layers = stack(1) { default: dense }
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
        }
    """)
    assert codes(diags) == [("E059", 5, 5), ("E059", 6, 5), ("E059", 11, 9), ("E059", 17, 9)]
    forward, torch, inp, cls = diags.errors
    assert forward.message == "component name 'forward' is an nn.Module attribute"
    assert torch.message == "component name 'torch' is used by the generated code"
    assert inp.message == "input name 'self' is used by the generated code"
    assert cls.message == "blocks 'my_block' and 'myBlock' would both become class MyBlockBlock"


# ---- a VLM's graph: modality (E131–E136) and its KV cache ----------------------------------

VLM_SPECS = ("vlm", "vlm_xattn", "vlm_mot", "vlm_moma", "vlm_rope2d")


@pytest.mark.parametrize("name", VLM_SPECS)
def test_only_a_non_causal_fusion_keeps_a_vlm_from_decoding(name):
    result = compile_spec(str(ROOT / "specs" / f"{name}.forge"))
    g = result.vlm_graphs[name]
    # the encoder's bidirectional attention is no obstacle: the image is encoded before decoding
    assert any(not d["args"].get("causal", True) for _, d in g.nodes(data=True)
               if d.get("part") == VISION_PREFIX and d.get("op") == "attention")
    if name == "vlm_moma":
        assert g.graph["supports_kv_cache"] is False
        assert g.graph["non_causal"] == [(FUSION, result.vlms[name].fusion.span)]
        assert codes(result.diagnostics, None) == [("N001", 10, 13)]  # at the fusion
        assert result.diagnostics.items[0].message == (
            "vlm 'vlm_moma' is training-only: moma 'fusion' is not causal, so it cannot decode "
            "with a KV cache")
    else:
        assert g.graph["supports_kv_cache"] is True and g.graph["non_causal"] == []
        assert codes(result.diagnostics, None) == []


def test_a_vlm_over_a_non_causal_decoder_is_noted_once(forge):
    llama = (ROOT / "specs" / "llama_debug.forge").read_text().replace(
        "rope = rope)", "rope = rope, causal = false)")
    result, diags = forge((ROOT / "specs" / "vlm.forge").read_text(),
                          extra={"llama_debug.forge": llama})
    assert [d.code for d in diags.items] == ["N001"]  # the decoder's, not restated for the vlm
    assert diags.items[0].span.file.endswith("llama_debug.forge")
    g = result.vlm_graphs["vlm"]
    assert g.graph["supports_kv_cache"] is False
    assert [fqn for fqn, _ in g.graph["non_causal"]] == [
        f"{TEXT_PREFIX}.layers.{i}.attention" for i in range(4)]
    c = vlm_cost(result, result.vlms["vlm"])
    assert not c.supports_kv_cache and c.kv_bytes_per_token == 0
    assert c.non_causal == [f"layers.{i}.attention" for i in range(4)]


def _relowered(adapter_args: dict):
    """specs/vlm.forge's graph, lowered again with its adapter's arguments changed."""
    result = compile_spec(str(ROOT / "specs" / "vlm.forge"))
    vlm = result.vlms["vlm"]
    adapter = dataclasses.replace(vlm.adapter, args={**vlm.adapter.args, **adapter_args})
    return vlm, lower_vlm(dataclasses.replace(vlm, adapter=adapter),
                          result.graphs[vlm.text], result.graphs[vlm.vision])


def test_the_modality_pass_reads_widths_off_the_graph():
    vlm, g = _relowered({})
    diags = Diagnostics()
    run_vlm_checks(g, diags)
    assert diags.items == []
    vlm, g = _relowered({"in_dim": 64, "out_dim": 32})
    assert g.nodes[ADAPTER]["shape"] == ("B", 64, 32)
    modality.run(g, diags)
    assert [(d.code, d.message, d.span) for d in diags.items] == [
        ("E131", "the adapter takes width 64 but 'vit_tiny' produces 96",
         vlm.adapter.arg_spans["in_dim"]),
        ("E131", "the adapter gives width 32 but 'llama_debug' takes 128",
         vlm.adapter.arg_spans["out_dim"])]
