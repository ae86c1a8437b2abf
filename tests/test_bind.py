"""compiler/bind.py: parameter values, op arguments, dataflow, layer stacks, warnings."""

from __future__ import annotations

import pytest
from conftest import SPECS, codes

from forgec.compiler.bind import MAX_LAYERS, FAct, FAdd, FApply, FMul, FRef, FScale, FSub
from forgec.compiler.driver import compile_spec

# The rest of a valid model; `params()` puts its lines first, from line 2 on.
TAIL = """\
  dim = 64
  token_embedding = embedding(256, dim)
  block dense(x) {
    n1 = rmsnorm(dim)
    return x + n1(x)
  }
  layers = stack(2) { default: dense }
  norm = rmsnorm(dim)
  output_head = lm_head(dim, 256)
}
"""


def params(forge, *lines: str, pre: str = "", **kw):
    """Compile a model whose first statements are `lines` (line 2, 3, ... of the model)."""
    body = "".join(f"  {line}\n" for line in lines)
    return forge(pre + "model m {\n" + body + TAIL, **kw)


def value(forge, expr: str):
    result, diags = params(forge, f"a = {expr}")
    assert codes(diags) == [], diags.errors
    return result.models["m"].params["a"]


# ---- arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("expr, expected", [
    ("8 / 2", 4),
    ("7 % 3", 1),
    ("-7 % 3", 2),
    ("2 + 3 * 4 - 1", 13),
    ("(2 + 3) * 4", 20),
    ("7.0 / 2", 3.5),
    ("1 / 4.0", 0.25),
    ("-(3 - 5)", 2),
    ("2 * 1.5", 3.0),
    ('"ab" + "cd"', "abcd"),
    ("[1, 2 * 3]", [1, 6]),
    ("true", True),
    ("min(3, 4.5)", 3),
    ("max(3, 4.5)", 4.5),
    ("9223372036854775806 + 1", (1 << 63) - 1),
    ("7 // 2", 3),
    ("-7 // 2", -4),
    ("8 * 64 // 3", 170),
    ("7.0 // 2", 3.0),
    ("7 // 2  # a comment", 3),
    ("7 /* a comment */ // 2", 3),
])
def test_arithmetic_values(forge, expr, expected):
    v = value(forge, expr)
    assert v == expected
    assert type(v) is type(expected)


def test_exact_division_yields_an_int(forge):
    v = value(forge, "4096 / 32")
    assert v == 128 and isinstance(v, int)


def test_inexact_division_is_E030_with_a_hint(forge):
    _, diags = params(forge, "a = 7 / 2", "b = 4096 / 3 * 2")
    assert codes(diags) == [("E030", 2, 7), ("E030", 3, 7)]
    d = diags.errors[0]
    assert d.message == "7 / 2 does not divide exactly"
    # the hint names the rounded-down value (how to round is the hint's business)
    assert "(3)" in d.hint and d.hint.endswith("or change the sizes")
    assert diags.errors[1].message == "4096 / 3 does not divide exactly"


def test_division_by_zero_is_E031_at_the_divisor(forge):
    _, diags = params(forge, "a = 1 / 0", "b = 1 % (2 - 2)", "c = 1.5 / 0.0", "d = 1.0 / 0")
    assert codes(diags) == [("E031", 2, 11), ("E031", 3, 12), ("E031", 4, 13), ("E031", 5, 13)]
    assert {d.message for d in diags.errors} == {"division by zero"}


def test_overflow_is_E032(forge):
    _, diags = params(forge, "a = 9223372036854775807 + 1", "b = 4294967296 * 4294967296",
                      "c = -9223372036854775807 - 2", "d = 1e308 * 10.0")
    assert codes(diags) == [("E032", 2, 7), ("E032", 3, 7), ("E032", 4, 7), ("E032", 5, 7)]
    assert diags.errors[0].message == "integer overflow: result exceeds 64 bits"
    assert diags.errors[3].message == "number out of range"


def test_type_errors_are_E033(forge):
    _, diags = params(forge, 'a = "x" * 2', "b = true + 1", 'c = -"s"', "d = [1] + 1",
                      "e = r + 1", "r = rope(head_dim = 16, max_seq_len = 8)")
    # binary operators are located at the operator itself
    assert codes(diags) == [("E033", 2, 11), ("E033", 3, 12), ("E033", 4, 7), ("E033", 5, 11),
                            ("E033", 6, 9)]
    a, b, c, d, e = diags.errors
    assert a.message == "cannot apply '*' to the string 'x' and the number 2"
    assert b.message == "cannot apply '+' to true and the number 1"
    assert c.message == "cannot negate the string 's'"
    assert d.message == "cannot apply '+' to a list and the number 1"
    assert e.message == "cannot apply '+' to the rope component 'r' and the number 1"


def test_type_error_across_lines_is_located_at_the_operator(forge):
    _, diags = params(forge, 'a = 1 +\n    "x"')
    assert codes(diags) == [("E033", 2, 9)]


def test_an_error_is_reported_once_however_often_the_name_is_read(forge):
    _, diags = params(forge, "a = 7 / 2", "b = a + a", "c = b * a")
    assert codes(diags) == [("E030", 2, 7)]


# ---- names ------------------------------------------------------------------------------------


def test_cyclic_definitions_are_E046_at_the_first_name(forge):
    _, diags = params(forge, "a = b", "b = c + 1", "c = a", "d = d * 2")
    assert codes(diags) == [("E046", 2, 3), ("E046", 5, 3)]
    assert diags.errors[0].message == "cyclic definition: a → b → c → a"
    assert diags.errors[1].message == "cyclic definition: d → d"


def test_definition_order_does_not_matter(forge):
    result, diags = params(forge, "a = b * 2", "b = dim + 1")
    assert codes(diags) == []
    assert result.models["m"].params["a"] == 130


def test_unknown_names_are_E021_with_did_you_mean(forge):
    _, diags = params(forge, "a = dimm + 1", "b = attention", "c = zzz")
    assert codes(diags) == [("E021", 2, 7), ("E021", 3, 7), ("E021", 4, 7)]
    dimm, op, zzz = diags.errors
    assert dimm.message == "unknown name 'dimm'"
    assert dimm.hint == "did you mean 'dim'?"
    assert op.message == "'attention' is an op; call it with arguments"
    assert zzz.message == "unknown name 'zzz'" and zzz.hint is None


def test_block_parameters_see_model_parameters(forge):
    result, diags = forge("""\
        model m {
          dim = 64
          token_embedding = embedding(256, dim)
          block dense(x) {
            wide = dim * 2
            up = linear(dim, wide)
            down = linear(wide, dim)
            return x + down(up(x))
          }
          layers = stack(2) { default: dense }
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
        }
    """)
    assert codes(diags, None) == []
    comps = result.models["m"].blocks["dense"].components
    assert (comps["up"].args["in_dim"], comps["up"].args["out_dim"]) == (64, 128)
    assert (comps["down"].args["in_dim"], comps["down"].args["out_dim"]) == (128, 64)


# ---- dotted references across sections -------------------------------------------------------

OTHER = "model o {\n  width = 96\n  r = rope(head_dim = 16, max_seq_len = 32)\n}\n"


def test_dotted_refs_read_another_sections_values(forge):
    result, diags = params(forge, "a = o.width * 2", "b = m.dim + 1", pre='import "o.forge"\n',
                           extra={"o.forge": OTHER})
    assert codes(diags) == []
    assert result.models["m"].params["a"] == 192
    assert result.models["m"].params["b"] == 65


def test_dotted_ref_to_a_component_of_another_model(forge):
    result, diags = params(forge, "att = attention(dim, heads = 4, rope = r)", "r = o.r",
                           pre='import "o.forge"\n', extra={"o.forge": OTHER})
    # `rope = r` names a local declaration that is the other model's rope
    assert codes(diags) == []
    att = result.models["m"].components["att"]
    assert att.args["rope"].component.args["head_dim"] == 16


def test_dotted_ref_errors(forge):
    _, diags = params(forge, "a = oo.width", "b = o.widht", "c = o.r.head_dim",
                      pre='import "o.forge"\n', extra={"o.forge": OTHER})
    assert codes(diags) == [("E021", 3, 7), ("E021", 4, 7), ("E021", 5, 7)]
    oo, widht, deep = diags.errors
    assert oo.message == "unknown section 'oo'" and oo.hint == "did you mean 'o'?"
    assert widht.message == "'o' has no 'widht'" and widht.hint == "did you mean 'width'?"
    assert deep.message == "'o.r.head_dim': only `section.name` is supported"


# ---- functions --------------------------------------------------------------------------------


@pytest.mark.parametrize("call, expected", [
    ("ffn_hidden(4096, multiplier = 1.3, multiple_of = 1024)", 14336),
    ("ffn_hidden(8192, multiplier = 1.3, multiple_of = 4096)", 28672),
    ("ffn_hidden(128, multiple_of = 64)", 384),
    ("ffn_hidden(4096)", 11008),
    ("ffn_hidden(dim, 1.0, 32)", 192),
    ("ffn_hidden(dim = 100, multiple_of = 1)", 266),
])
def test_ffn_hidden(forge, call, expected):
    assert value(forge, call) == expected


def test_function_argument_errors(forge):
    _, diags = params(forge, "a = ffn_hidden(128, multiple_of = 0)", "b = ffn_hidden(0)",
                      "c = ffn_hidden(dim, multiplier = -1.0)", "d = ffn_hiden(dim)",
                      "e = ffn_hidden()")
    assert codes(diags) == [("E073", 2, 23), ("E073", 3, 18), ("E026", 4, 36), ("E022", 5, 7),
                            ("E024", 6, 7)]
    assert diags.errors[0].message == "'multiple_of' of ffn_hidden() must be positive, got 0"
    assert diags.errors[3].hint == "did you mean 'ffn_hidden'?"


# ---- op arguments -----------------------------------------------------------------------------


def test_op_arguments_bind_with_defaults_and_derived_values(forge):
    result, diags = params(forge, "att = attention(dim, heads = 4)",
                           "gqa = attention(dim, 8, kv_heads = 2, head_dim = 16, causal = false, "
                           "window = 32)")
    assert codes(diags) == []
    att = result.models["m"].components["att"].args
    assert (att["dim"], att["heads"], att["kv_heads"], att["head_dim"]) == (64, 4, 4, 16)
    assert (att["rope"], att["causal"], att["window"], att["qk_norm"]) == (None, True, 0, False)
    gqa = result.models["m"].components["gqa"].args
    assert (gqa["heads"], gqa["kv_heads"], gqa["head_dim"]) == (8, 2, 16)
    assert (gqa["causal"], gqa["window"]) == (False, 32)


def test_unknown_op_is_E022(forge):
    _, diags = params(forge, "a = rmsnrom(64)", "b = frobnicate(1)")
    assert codes(diags) == [("E022", 2, 7), ("E022", 3, 7)]
    assert diags.errors[0].message == "unknown op or function 'rmsnrom'"
    assert diags.errors[0].hint == "did you mean 'rmsnorm'?"


def test_unknown_argument_is_E023_at_its_name(forge):
    _, diags = params(forge, "a = rmsnorm(64, epss = 1e-6)", "b = rmsnorm(64, zzz = 1)",
                      "c = attention(dim, head = 4)")
    # a misspelt required argument is not reported missing as well
    assert codes(diags) == [("E023", 2, 19), ("E023", 3, 19), ("E023", 4, 22)]
    epss, zzz, head = diags.errors
    assert epss.message == "rmsnorm() has no argument 'epss'"
    assert epss.hint == "did you mean 'eps'?"
    assert zzz.hint.startswith("arguments: dim, eps")
    assert head.hint == "did you mean 'heads'?"


def test_missing_argument_is_E024_at_the_call(forge):
    _, diags = params(forge, "a = rmsnorm(eps = 1e-6)", "b = attention(dim)")
    assert codes(diags) == [("E024", 2, 7), ("E024", 3, 7)]
    assert diags.errors[0].message == "rmsnorm() is missing the argument 'dim'"
    assert diags.errors[1].message == "attention() is missing the argument 'heads'"
    assert diags.errors[1].hint == "heads: query heads"


def test_wrong_argument_type_is_E025_at_the_value(forge):
    _, diags = params(forge, "a = rmsnorm(true)", 'c = rmsnorm(64, eps = "x")',
                      "d = attention(64, 4, causal = 1)", "e = rmsnorm(6.5)")
    assert codes(diags) == [("E025", 2, 15), ("E025", 3, 25), ("E025", 4, 33), ("E025", 5, 15)]
    a, c, d, e = diags.errors
    assert a.message == "argument 'dim' of rmsnorm() expects an integer, got true"
    assert c.message == "argument 'eps' of rmsnorm() expects a number, got the string 'x'"
    assert d.message == "argument 'causal' of attention() expects true or false, got the number 1"
    assert e.message == "argument 'dim' of rmsnorm() expects an integer, got the number 6.5"


def test_an_integer_is_accepted_for_a_float(forge):
    result, diags = params(forge, "a = rmsnorm(64, eps = 1)")
    assert codes(diags) == []
    eps = result.models["m"].components["a"].args["eps"]
    assert eps == 1.0 and isinstance(eps, float)


def test_out_of_range_is_E026(forge):
    _, diags = params(forge, "a = rmsnorm(64, eps = 2.0)", "b = attention(64, heads = 4, window = -1)",
                      'c = rope(head_dim = 16, max_seq_len = 8, scaling = "llama2")',
                      "d = rope(head_dim = 16, max_seq_len = 8, theta = 0.5)")
    assert codes(diags) == [("E026", 2, 25), ("E026", 3, 41), ("E026", 4, 54), ("E026", 5, 52)]
    eps, window, scaling, theta = diags.errors
    assert eps.message == "argument 'eps' of rmsnorm() must be in [0.0, 1.0], got 2.0"
    assert window.message == "argument 'window' of attention() must be ≥ 0, got -1"
    assert scaling.message == ("argument 'scaling' of rope() must be one of 'none', 'llama3', "
                               "'linear', 'dynamic', 'yarn', 'longrope', got the string 'llama2'")
    assert scaling.hint == "did you mean 'llama3'?"
    assert theta.message == "argument 'theta' of rope() must be ≥ 1.0, got 0.5"


def test_duplicate_and_misplaced_arguments_are_E027(forge):
    _, diags = params(forge, "a = rmsnorm(64, dim = 32)", "b = rmsnorm(dim = 64, 1e-6)")
    assert codes(diags) == [("E027", 2, 19), ("E027", 3, 25)]
    twice, positional = diags.errors
    assert twice.message == "argument 'dim' given twice"
    assert [(n, s.line, s.col) for n, s in twice.notes] == [("first given here", 2, 15)]
    assert positional.message == "positional argument after a named one"


def test_too_many_positional_arguments_is_E028(forge):
    _, diags = params(forge, "a = rmsnorm(64, 1e-6, false, 3)")
    assert codes(diags) == [("E028", 2, 32)]
    assert diags.errors[0].message == "rmsnorm() takes at most 3 positional arguments"


def test_positional_arguments_reach_derived_ones_last(forge):
    # attention(dim, heads, rope, causal, window, ..., kv_heads, head_dim): derived last
    result, diags = params(forge, "a = attention(64, 4, r, false, 8)",
                           "r = rope(head_dim = 16, max_seq_len = 8)")
    assert codes(diags) == []
    args = result.models["m"].components["a"].args
    assert args["rope"].component.name == "r"
    assert (args["causal"], args["window"], args["kv_heads"], args["head_dim"]) == (False, 8, 4, 16)
    _, diags = params(forge, "a = attention(64, 4, 2)")
    assert codes(diags) == [("E025", 2, 24)]


@pytest.mark.parametrize("given, scaling", [
    ("llama3", "llama3"),
    ('"llama3"', "llama3"),
    ("none", "none"),
])
def test_choice_arguments_accept_bare_symbols(forge, given, scaling):
    result, diags = params(forge, f"r = rope(head_dim = 16, max_seq_len = 8, scaling = {given})")
    assert codes(diags) == []
    assert result.models["m"].components["r"].args["scaling"] == scaling


def test_choice_symbol_shadowed_by_a_parameter_reads_the_parameter(forge):
    _, diags = params(forge, "llama3 = 5", "r = rope(head_dim = 16, max_seq_len = 8, scaling = llama3)")
    assert codes(diags) == [("E026", 3, 54)]
    assert diags.errors[0].message.endswith("got the number 5")


def test_choice_from_a_string_parameter(forge):
    result, diags = params(forge, 's = "llama3"', "r = rope(head_dim = 16, max_seq_len = 8, scaling = s)")
    assert codes(diags) == []
    assert result.models["m"].components["r"].args["scaling"] == "llama3"


def test_ref_arguments_name_a_component(forge):
    result, diags = params(forge, "rope = rope(head_dim = 16, max_seq_len = 8)",
                           "att = attention(dim, heads = 4, rope = rope)")
    assert codes(diags) == []
    comps = result.models["m"].components
    assert comps["att"].args["rope"].component is comps["rope"]


def test_ref_argument_of_the_wrong_kind_is_E025(forge):
    _, diags = params(forge, "b = attention(64, heads = 4, rope = dim)",
                      "c = attention(64, heads = 4, rope = token_embedding)",
                      "e = attention(64, heads = 4, rope = r2)",
                      "f = attention(64, heads = 4, rope = 3)",
                      "r = rope(head_dim = 16, max_seq_len = 8)")
    assert codes(diags) == [("E025", 2, 39), ("E025", 3, 39), ("E021", 4, 39), ("E025", 5, 39)]
    b, c, e, f = diags.errors
    assert b.message == "argument 'rope' of attention() expects a rope or rope2d component, got the number 64"
    assert c.message == ("argument 'rope' of attention() expects a rope or rope2d component, got the "
                         "embedding component 'token_embedding'")
    assert e.hint == "did you mean 'r'?"
    assert f.message == "argument 'rope' of attention() expects a rope or rope2d component"


def test_ops_inside_parameter_expressions_are_E047(forge):
    _, diags = params(forge, "a = 2 * rmsnorm(64)", "b = stack(2) + 1")
    assert codes(diags) == [("E047", 2, 11), ("E047", 3, 7)]


# ---- the spine ---------------------------------------------------------------------------------


def test_missing_spine_members_are_E080_at_the_model_name(forge):
    _, diags = forge("""\
        model m {
          dim = 64
          block dense(x) { return x }
          layers = stack(2) { default: dense }
        }
    """)
    assert codes(diags) == [("E080", 1, 7)] * 3
    assert [d.message for d in diags.errors] == [
        "model 'm' has no 'token_embedding'", "model 'm' has no 'norm'",
        "model 'm' has no 'output_head'"]
    assert diags.errors[0].hint == "declare `token_embedding = embedding(...)`"


def test_missing_stack_is_E080_with_the_rule_syntax_in_the_hint(forge):
    _, diags = forge("""\
        model m {
          dim = 64
          token_embedding = embedding(256, dim)
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
        }
    """)
    assert codes(diags) == [("E080", 1, 7)]
    assert diags.errors[0].message == "model 'm' has no 'layers'"
    assert "{ default: BLOCK }" in diags.errors[0].hint


def test_spine_members_of_the_wrong_op_are_E081(forge):
    _, diags = forge("""\
        model m {
          dim = 64
          token_embedding = linear(dim, dim)
          block dense(x) { return x }
          layers = stack(2) { default: dense }
          norm = linear(dim, dim)
          output_head = 5
          extra = stack(2) { default: dense }
        }
    """)
    assert codes(diags) == [("E081", 3, 3), ("E081", 6, 3), ("E081", 7, 3), ("E081", 8, 3)]
    emb, norm, head, extra = diags.errors
    assert emb.message == "'token_embedding' must be embedding(...), not linear(...)"
    assert norm.message == "'norm' must be rmsnorm or layernorm(...), not linear(...)"
    assert head.message == "'output_head' must be lm_head(...)"
    assert extra.message == "a stack must be named 'layers', not 'extra'"


# ---- dataflow ----------------------------------------------------------------------------------

BLOCK_MODEL = """\
model m {{
  dim = 64
  token_embedding = embedding(256, dim)
  block dense(x) {{
    n1 = rmsnorm(dim)
    mlp = swiglu(dim, hidden = 128)
{body}
  }}
  layers = stack(2) {{ default: dense }}
  norm = rmsnorm(dim)
  output_head = lm_head(dim, 256)
}}
"""


def block(forge, *lines: str):
    """A model whose block `dense` has n1, mlp, then `lines` from line 7 on."""
    return forge(BLOCK_MODEL.format(body="\n".join(f"    {line}" for line in lines)))


def test_dataflow_tree(forge):
    result, diags = block(forge, "h = x + mlp(n1(x))", "return h * 0.5 + 2 * x")
    assert codes(diags, None) == []
    b = result.models["m"].blocks["dense"]
    assert b.inputs == ("x",)
    ((name, expr, span),) = b.flow
    assert name == "h" and span.line == 7
    assert isinstance(expr, FAdd)
    assert isinstance(expr.left, FRef) and expr.left.name == "x"
    assert isinstance(expr.right, FApply) and expr.right.component == "mlp"
    (inner,) = expr.right.args
    assert isinstance(inner, FApply) and inner.component == "n1"
    assert inner.args[0].name == "x"
    ret = b.ret
    assert isinstance(ret, FAdd)
    assert isinstance(ret.left, FScale) and ret.left.factor == 0.5
    assert ret.left.operand.name == "h"
    assert isinstance(ret.right, FScale) and ret.right.factor == 2.0
    assert ret.right.operand.name == "x"
    assert b.ret_span.line == 8


def test_op_applied_without_declaring_it_is_E047(forge):
    _, diags = block(forge, "a = rmsnorm(x)", "return x + mlp(n1(a))")
    assert codes(diags) == [("E047", 7, 9)]
    assert diags.errors[0].message == \
        "op 'rmsnorm' must be declared as a component before it is applied"


@pytest.mark.parametrize("lines, where", [
    (("h = x + g", "g = n1(x)", "return h + mlp(g)"), (7, 13)),
    # a statement reading only a later value is dataflow too, not a parameter
    (("h = n1(g)", "g = mlp(x)", "return h + g"), (7, 12)),
])
def test_value_used_before_it_is_computed_is_E048(forge, lines, where):
    _, diags = block(forge, *lines)
    assert codes(diags) == [("E048", *where)]
    assert diags.errors[0].message == "'g' is used before it is computed"


def test_model_level_component_applied_in_a_block_is_E049(forge):
    _, diags = block(forge, "h = norm(x)", "return h + mlp(n1(h))")
    assert codes(diags) == [("E049", 7, 9)]
    assert diags.errors[0].message == "model-level 'norm' cannot be applied inside a block"
    assert diags.errors[0].hint == "declare the component inside the block"


@pytest.mark.parametrize("line, col, message", [
    # '-' and '*' of two tensors are element-wise (test_element_wise_products_...)
    ("h = x / mlp(n1(x))", 11, "'/' is not defined on tensors"),
    ("h = x - 1.0", 11, "'-' subtracts a tensor from a tensor"),
    ('h = mlp(n1(x)) * "s"', 22, "a tensor can only be scaled by a number, got the string 's'"),
    ("h = mlp(n1(x, y = 1))", 19, "components are applied to tensors, not named arguments"),
])
def test_non_tensor_arithmetic_is_E053(forge, line, col, message):
    _, diags = block(forge, line, "return x + h")
    assert codes(diags) == [("E053", 7, col)]
    assert diags.errors[0].message == message


def test_returning_a_parameter_is_E053(forge):
    _, diags = block(forge, "h = x + mlp(n1(x))", "return h + dim")
    assert codes(diags) == [("E053", 8, 16)]
    assert diags.errors[0].message == "expected a tensor, got 'dim'"


def test_unknown_component_in_dataflow_is_E021(forge):
    _, diags = block(forge, "h = x + mpl(n1(x))", "return h")
    assert codes(diags) == [("E021", 7, 13)]
    assert diags.errors[0].message == "unknown component 'mpl'"
    assert diags.errors[0].hint == "did you mean 'mlp'?"


# ---- stack selectors -----------------------------------------------------------------------

STACK_MODEL = """\
model m {{
  dim = 64
  n = {n}
  k = 2
  s = "a"
  token_embedding = embedding(256, dim)
  block dense(x) {{
    n1 = rmsnorm(dim)
    return x + n1(x)
  }}
  block moe(x) {{
    n1 = rmsnorm(dim)
    return x + n1(x)
  }}
  block two(x, y) {{
    return x + y
  }}
  layers = stack(n) {{ {rules} }}
  norm = rmsnorm(dim)
  output_head = lm_head(dim, 256)
}}
"""
STACK_LINE = 18
RULES_COL = 23  # column of the first rule on the stack line


def stack(forge, rules: str, n: int = 8):
    return forge(STACK_MODEL.format(n=n, rules=rules))


D, M = "dense", "moe"


@pytest.mark.parametrize("rules, layers, inserted", [
    ("default: dense", [D] * 8, []),
    ("default: dense  first 2: moe", [M, M, D, D, D, D, D, D], []),
    ("default: dense  last 3: moe", [D, D, D, D, D, M, M, M], []),
    ("default: dense  every 3: moe", [D, D, M, D, D, M, D, D], []),
    ("default: dense  every 3 from 1: moe", [D, M, D, D, M, D, D, M], []),
    ("default: dense  every k from 0: moe", [M, D, M, D, M, D, M, D], []),
    ("default: dense  at 5: moe", [D, D, D, D, D, M, D, D], []),
    ("default: dense  first n: moe", [M] * 8, []),
    ("first 4: dense  last 4: moe", [D] * 4 + [M] * 4, []),
    ("default: moe  first 8: dense", [D] * 8, []),  # later rules win
    ("default: dense  after every 2: moe", [D] * 8, [(1, M), (3, M), (5, M), (7, M)]),
    ("default: dense  after at 0: moe  after last 1: moe", [D] * 8, [(0, M), (7, M)]),
    ("default: dense  after last 1: moe  after at 2: dense", [D] * 8, [(2, D), (7, M)]),
])
def test_stack_selectors(forge, rules, layers, inserted):
    result, diags = stack(forge, rules)
    assert codes(diags) == []
    model = result.models["m"]
    assert [s.block for s in model.layers] == layers
    assert [s.index for s in model.layers] == list(range(8))
    assert [(i.after, i.block) for i in model.inserted] == inserted


def test_every_step_from_a_parameter(forge):
    result, diags = stack(forge, "default: dense  every k: moe", n=5)
    assert codes(diags) == []
    assert [s.block for s in result.models["m"].layers] == [D, M, D, M, D]


def test_layer_slot_remembers_its_rule(forge):
    result, _ = stack(forge, "default: dense  at 5: moe")
    slots = result.models["m"].layers
    assert slots[0].span.col == RULES_COL
    assert slots[5].span.col == RULES_COL + len("default: dense  ")


def test_unknown_block_is_E060_and_multi_input_block_is_E062(forge):
    _, diags = stack(forge, "default: dnese  default: two")
    # layers left unfilled because of those rules are not reported again
    assert codes(diags) == [("E060", STACK_LINE, 32), ("E062", STACK_LINE, 48)]
    assert diags.errors[0].message == "unknown block 'dnese'"
    assert diags.errors[0].hint == "did you mean 'dense'?"
    assert diags.errors[1].message == "block 'two' takes 2 inputs; a stack feeds one"


@pytest.mark.parametrize("rules, n, message", [
    ("first 2: dense  last 2: moe", 8, "layers 2, 3, 4, 5 of 8 have no block"),
    ("first 1: dense  last 1: moe", 9, "layers 1, 2, 3, 4, 5, 6, ... of 9 have no block"),
    ("every 2: dense", 4, "layers 0, 2 of 4 have no block"),
    ("first 2: dense", 3, "layer 2 of 3 has no block"),
])
def test_unfilled_layers_are_E061_listing_them(forge, rules, n, message):
    _, diags = stack(forge, rules, n=n)
    assert codes(diags) == [("E061", STACK_LINE, 3)]
    assert diags.errors[0].message == message
    assert diags.errors[0].hint == "add `default: BLOCK` to the stack"


def test_malformed_selectors_are_E063(forge):
    _, diags = stack(forge, "default: dense  evry 2: moe  after: moe  every 2 2: moe  at dim2: moe  "
                            "first: moe  every 2 from: moe  at s: moe")
    assert codes(diags) == [("E063", STACK_LINE, 39), ("E063", STACK_LINE, 52),
                            ("E063", STACK_LINE, 64), ("E021", STACK_LINE, 83),
                            ("E063", STACK_LINE, 94), ("E063", STACK_LINE, 106),
                            ("E063", STACK_LINE, 128)]
    evry, after, twice, _, first, frm, string = diags.errors
    assert evry.message == "unknown stack selector 'evry'" and evry.hint == "did you mean 'every'?"
    assert after.message == "'after' needs a selector, e.g. `after every 2: BLOCK`"
    assert twice.message == "malformed selector 'every 2 2'"
    assert first.message == "malformed selector 'first'"
    assert frm.message == "malformed selector 'every 2 from'"
    assert string.message == "a selector takes integers, got the string 'a'"


def test_selectors_outside_the_stack_are_E064(forge):
    _, diags = stack(forge, "default: dense  first 9: moe  last 0: moe  at 8: moe  every 0: moe  "
                            "every 2 from 8: moe")
    assert codes(diags) == [("E064", STACK_LINE, 39), ("E064", STACK_LINE, 53),
                            ("E064", STACK_LINE, 66), ("E064", STACK_LINE, 77),
                            ("E064", STACK_LINE, 91)]
    assert [d.message for d in diags.errors] == [
        "'first 9' selects outside the stack of 8",
        "'last 0' selects outside the stack of 8",
        "layer 8 is outside the stack (0..7)",
        "'every 0' needs a positive step",
        "'from 8' is outside the stack (0..7)",
    ]


def test_stack_size_limits(forge):
    _, diags = stack(forge, "default: dense", n=MAX_LAYERS + 1)
    assert codes(diags) == [("E026", STACK_LINE, 18)]
    assert diags.errors[0].message == f"a stack has at most {MAX_LAYERS} layers, got 4,097"


def test_largest_stack_is_accepted(forge):
    result, diags = stack(forge, "default: dense", n=MAX_LAYERS)
    assert codes(diags) == []
    assert len(result.models["m"].layers) == MAX_LAYERS


@pytest.mark.parametrize("n", [0, -1])
def test_empty_stack_is_E073(forge, n):
    _, diags = stack(forge, "default: dense", n=n)
    assert codes(diags) == [("E073", STACK_LINE, 18)]
    assert diags.errors[0].message == f"a stack needs at least one layer, got {n}"


# ---- warnings ---------------------------------------------------------------------------------


def test_unused_things_are_warnings(forge):
    result, diags = forge("""\
        model m {
          dim = 64
          unused = 3
          spare = rmsnorm(dim)
          token_embedding = embedding(256, dim)
          block dense(x) {
            n1 = rmsnorm(dim)
            n2 = rmsnorm(dim)
            r = rope(head_dim = 16, max_seq_len = 8)
            k = 3
            return x + n1(x)
          }
          block other(x) {
            return x
          }
          layers = stack(2) { default: dense }
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
        }
    """)
    assert result is not None  # warnings do not fail the compile
    assert codes(diags, None) == [("W001", 3, 3), ("W001", 4, 3), ("W002", 8, 5), ("W003", 13, 9)]
    assert [d.message for d in diags.items if d.severity == "warning"] == [
        "parameter 'unused' is never used",
        "component 'spare' is never used",
        "component 'n2' of block 'dense' is never applied",
        "block 'other' is not used by the stack",
    ]


def test_inherited_declarations_are_not_warned_about_again(forge):
    _, diags = forge("""\
        model base {
          dim = 64
          token_embedding = embedding(256, dim)
          block dense(x) {
            n1 = rmsnorm(dim)
            return x + n1(x)
          }
          layers = stack(2) { default: dense }
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
          spare = 1
        }
        model d extends base {
          dim = 32
        }
    """)
    # base's own warning is reported once; d does not repeat it
    assert codes(diags, None) == [("W001", 11, 3)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_committed_specs_have_no_errors_or_warnings(spec):
    result = compile_spec(str(spec))
    assert codes(result.diagnostics, "error") == []
    assert codes(result.diagnostics, "warning") == []


# ---- every independent error in one run -----------------------------------------------------


def test_all_independent_errors_are_reported_in_one_run(forge):
    _, diags = forge("""\
        model m {
          dim = 64
          bad_div = dim / 3
          typo = dimm
          att = attention(dim, heads = 4, wndow = 2)
          norm2 = rmsnorm(true)
          token_embedding = embedding(256, dim)
          block dense(x) {
            n1 = rmsnorm(dim)
            a = layernorm(x)
            return x + n1(a)
          }
          layers = stack(3) { default: dense  at 3: dense  first 1: blok }
          norm = rmsnorm(dim)
          output_head = lm_head(dim, 256)
          heads_bad = attention(dim, heads = 5)
          cyc = cyc
        }
    """)
    assert codes(diags) == [("E030", 3, 13), ("E021", 4, 10), ("E023", 5, 35), ("E025", 6, 19),
                            ("E047", 10, 9), ("E064", 13, 39), ("E060", 13, 61),
                            ("E070", 16, 30), ("E046", 17, 3)]


def test_element_wise_products_differences_and_activations_bind(forge):
    result, diags = block(forge, "h = x - mlp(n1(x)) * x",
                          "return x + softcap(square(relu(h)), 30) * sigmoid(n1(h))")
    assert codes(diags, None) == []
    b = result.models["m"].blocks["dense"]
    ((_, expr, _),) = b.flow
    assert isinstance(expr, FSub) and isinstance(expr.right, FMul)
    assert isinstance(expr.right.left, FApply) and isinstance(expr.right.right, FRef)
    product = b.ret.right
    assert isinstance(product, FMul)
    cap = product.left
    assert isinstance(cap, FAct) and cap.name == "softcap" and cap.args == (30.0,)
    assert cap.operand.name == "square" and cap.operand.operand.name == "relu"
    assert product.right.name == "sigmoid" and product.right.args == ()


@pytest.mark.parametrize("line, col, message", [
    ("h = softcap(x)", 9, "softcap() is missing the argument 'cap'"),
    ("h = softcap(x, 0.0)", 20, "'cap' of softcap() must be positive, got 0.0"),
    ("h = silu(x, 2)", 9, "silu() takes 1 argument: a tensor"),
    ("h = x + silu(dim)", 18, "expected a tensor, got 'dim'"),
    ("h = x + relu()", 13, "relu() takes a tensor as its first argument"),
])
def test_misused_activations_are_located(forge, line, col, message):
    _, diags = block(forge, line, "return x + h")
    assert [(d.line, d.col) for d in (e.span for e in diags.errors)] == [(7, col)]
    assert diags.errors[0].message == message
