"""compiler/parse.py: text → AST shapes, positions, literals and syntax errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from forgec.compiler import ast
from forgec.compiler.diagnostics import ForgeError, Span
from forgec.compiler.parse import MAX_EXPR_DEPTH, parse

F = "t.forge"


def p(text: str) -> ast.Module:
    return parse(textwrap.dedent(text), F)


def body(text: str) -> tuple:
    """The statements of the single section in `text`."""
    (sec,) = p(text).sections
    return sec.body


def value(expr_text: str):
    """The AST of one expression, parsed as `a = <expr>` on line 2, column 7."""
    (stmt,) = body(f"model m {{\n  a = {expr_text}\n}}\n")
    assert isinstance(stmt, ast.Assign)
    return stmt.value


def err(text: str):
    with pytest.raises(ForgeError) as info:
        parse(textwrap.dedent(text), F)
    return info.value.diagnostic


def S(line: int, col: int, end_line: int, end_col: int) -> Span:
    return Span(F, line, col, end_line, end_col)


# ---- sections and statements ------------------------------------------------------------


def test_empty_file_is_an_empty_module():
    m = parse("", F)
    assert m == ast.Module(F, (), ())
    assert parse("# only a comment\n/* and\n a block comment */\n", F) == ast.Module(F, (), ())


def test_imports_and_sections_with_positions():
    m = p("""\
        import "base.forge"
        import "sub/other.forge"
        model small extends base {
        }
        plan fsdp for small {
        }
    """)
    assert m.file == F
    assert m.imports == (ast.Import("base.forge", S(1, 1, 1, 20)),
                         ast.Import("sub/other.forge", S(2, 1, 2, 25)))
    small, plan = m.sections
    assert (small.kind, small.name) == ("model", "small")
    assert small.kind_span == S(3, 1, 3, 6)
    assert small.name_span == S(3, 7, 3, 12)
    assert small.base == ("base", S(3, 21, 3, 25))
    assert small.target is None
    assert small.body == ()
    assert small.span == S(3, 1, 4, 2)
    assert (plan.kind, plan.name, plan.base) == ("plan", "fsdp", None)
    assert plan.target == ("small", S(5, 15, 5, 20))


def test_any_word_is_a_section_kind_for_the_parser():
    # which kinds exist is decided by resolve.py (E013), not the grammar
    (sec,) = p("modle m { }").sections
    assert sec.kind == "modle"


def test_assignment_shape_and_positions():
    (stmt,) = body("""\
        model m {
          dim = 64
        }
    """)
    assert stmt == ast.Assign("dim", S(2, 3, 2, 6), ast.Int(64, S(2, 9, 2, 11)), S(2, 3, 2, 11))


def test_empty_statements_are_dropped():
    stmts = body("model m { ; a = 1 ;; b = 2 ; }")
    assert [s.name for s in stmts] == ["a", "b"]


def test_call_statement():
    (stmt,) = body("""\
        model m {
          check(dim)
        }
    """)
    assert isinstance(stmt, ast.CallStmt)
    assert stmt.span == S(2, 3, 2, 13)
    assert stmt.call.func == ast.Ref(("check",), S(2, 3, 2, 8))
    assert stmt.call.args == (ast.Arg(None, ast.Ref(("dim",), S(2, 9, 2, 12)), S(2, 9, 2, 12)),)


def test_stack_rules_are_words_and_integers():
    (stmt,) = body("""\
        model m {
          layers = stack(n) {
            default: dense
            every 2 from first_moe: moe
            after at 3: extra
          }
        }
    """)
    assert isinstance(stmt, ast.RuleAssign)
    assert stmt.name == "layers"
    assert stmt.name_span == S(2, 3, 2, 9)
    assert stmt.span == S(2, 3, 6, 4)
    assert stmt.call.func.parts == ("stack",)
    assert stmt.call.span == S(2, 12, 2, 20)
    default, every, after = stmt.rules
    assert default.words == (ast.RuleWord("default", S(3, 5, 3, 12)),)
    assert (default.target, default.target_span) == ("dense", S(3, 14, 3, 19))
    assert default.span == S(3, 5, 3, 19)
    assert [w.value for w in every.words] == ["every", 2, "from", "first_moe"]
    assert isinstance(every.words[1].value, int)
    assert every.words[1].span == S(4, 11, 4, 12)
    assert every.target == "moe"
    assert [w.value for w in after.words] == ["after", "at", 3]
    assert after.target == "extra"


def test_empty_stack_body_parses():
    (stmt,) = body("model m { layers = stack(4) { } }")
    assert isinstance(stmt, ast.RuleAssign) and stmt.rules == ()


def test_block_declaration_shape():
    (blk,) = body("""\
        model m {
          block dense(x, y,) extends base {
            n = rmsnorm(dim)
            return x + n(y)
          }
        }
    """)
    assert isinstance(blk, ast.BlockDecl)
    assert blk.name == "dense"
    assert blk.name_span == S(2, 9, 2, 14)
    assert blk.inputs == (("x", S(2, 15, 2, 16)), ("y", S(2, 18, 2, 19)))
    assert blk.base == ("base", S(2, 30, 2, 34))
    assert blk.span == S(2, 3, 5, 4)
    decl, ret = blk.body
    assert isinstance(decl, ast.Assign) and decl.name == "n"
    assert isinstance(ret, ast.Return)
    assert ret.span == S(4, 5, 4, 20)
    assert isinstance(ret.value, ast.BinOp) and ret.value.op == "+"


def test_block_without_inputs():
    (blk,) = body("model m { block b() { return 1 } }")
    assert blk.inputs == () and blk.base is None


# ---- expressions -------------------------------------------------------------------------


def test_literals():
    assert value("42") == ast.Int(42, S(2, 7, 2, 9))
    assert value("2.5") == ast.Float(2.5, S(2, 7, 2, 10))
    assert value("1e-5") == ast.Float(1e-5, S(2, 7, 2, 11))
    assert value("3.") == ast.Float(3.0, S(2, 7, 2, 9))
    assert value("true") == ast.Bool(True, S(2, 7, 2, 11))
    assert value("false") == ast.Bool(False, S(2, 7, 2, 12))
    assert value('"llama"') == ast.Str("llama", S(2, 7, 2, 14))


def test_integer_and_float_underscores():
    assert value("128_256").value == 128256
    assert value("1_000_000").value == 1_000_000
    assert value("1_0.2_5").value == 10.25
    assert value("0_07").value == 7


def test_integer_literal_limit():
    assert value("9223372036854775807").value == (1 << 63) - 1
    d = err("model m {\n  a = 9223372036854775808\n}\n")
    assert (d.code, d.span.line, d.span.col) == ("E032", 2, 7)
    assert "too large" in d.message


@pytest.mark.parametrize("src, expected", [
    (r'"a\"b"', 'a"b'),
    (r'"back\\slash"', "back\\slash"),
    (r'"x\ny"', "x\ny"),
    (r'"x\ty"', "x\ty"),
    (r'"\\n"', "\\n"),
    ('""', ""),
])
def test_string_escapes(src, expected):
    assert value(src).value == expected


@pytest.mark.parametrize("escape", ["q", "0", "'", "u"])
def test_invalid_string_escape_is_E003_at_the_string(escape):
    d = err(f'model m {{\n  name = "ab\\{escape}c"\n}}\n')
    assert d.code == "E003"
    assert d.span == S(2, 10, 2, 17)
    assert d.message == f"invalid escape '\\{escape}' in string"


def test_import_path_escapes_are_checked_too():
    d = err('import "a\\qb.forge"\n')
    assert (d.code, d.span.line, d.span.col) == ("E003", 1, 8)


def test_refs_and_dotted_refs():
    assert value("n_heads") == ast.Ref(("n_heads",), S(2, 7, 2, 14))
    r = value("vit_tiny.dim")
    assert r.parts == ("vit_tiny", "dim") and r.dotted == "vit_tiny.dim"
    assert r.span == S(2, 7, 2, 19)


def test_call_with_positional_and_keyword_arguments():
    c = value("attention(dim, heads = 4, rope = rope,)")
    assert isinstance(c, ast.Call)
    assert c.func == ast.Ref(("attention",), S(2, 7, 2, 16))
    assert c.span == S(2, 7, 2, 46)
    a0, a1, a2 = c.args
    assert a0 == ast.Arg(None, ast.Ref(("dim",), S(2, 17, 2, 20)), S(2, 17, 2, 20))
    assert a1 == ast.Arg("heads", ast.Int(4, S(2, 30, 2, 31)), S(2, 22, 2, 31), S(2, 22, 2, 27))
    assert a2.name == "rope" and a2.value == ast.Ref(("rope",), S(2, 40, 2, 44))
    assert a2.name_span == S(2, 33, 2, 37)


def test_call_without_arguments_and_dotted_callee():
    c = value("ns.f()")
    assert c.func.parts == ("ns", "f") and c.args == ()


def test_lists():
    lst = value("[1, x, [2],]")
    assert isinstance(lst, ast.ListExpr)
    assert lst.span == S(2, 7, 2, 19)
    one, x, inner = lst.items
    assert one == ast.Int(1, S(2, 8, 2, 9))
    assert x == ast.Ref(("x",), S(2, 11, 2, 12))
    assert inner == ast.ListExpr((ast.Int(2, S(2, 15, 2, 16)),), S(2, 14, 2, 17))
    assert value("[]") == ast.ListExpr((), S(2, 7, 2, 9))


def test_precedence_and_associativity():
    e = value("1 + 2 * 3 - 4")  # (1 + (2 * 3)) - 4
    assert e.op == "-"
    assert e.left.op == "+"
    assert e.left.left.value == 1
    assert e.left.right.op == "*"
    assert (e.left.right.left.value, e.left.right.right.value) == (2, 3)
    assert e.right.value == 4

    e = value("a - b - c")  # left-associative
    assert e.op == "-" and e.left.op == "-" and e.right.parts == ("c",)

    e = value("8 / 2 % 3")  # (8 / 2) % 3
    assert e.op == "%" and e.left.op == "/"

    e = value("(1 + 2) * 3")
    assert e.op == "*" and e.left.op == "+"
    assert e.left.span == S(2, 8, 2, 13)  # parentheses are not part of the node


def test_binop_spans():
    e = value("dim  *  2")
    assert e.span == S(2, 7, 2, 16)
    # the operator's span is the operator itself
    assert e.op_span == S(2, 12, 2, 13)
    # ... also with parentheses and comments in the gap
    e = value("(dim) /* times: / * */ //  # not here: * \n (2)")
    assert e.op == "//" and e.op_span == S(2, 30, 2, 32)
    e = value("dim # a / b\n  / 2")
    assert e.op == "/" and e.op_span == S(3, 3, 3, 4)


def test_negation():
    e = value("-x * 2")  # unary minus binds tighter than '*'
    assert e.op == "*"
    assert e.left == ast.Neg(ast.Ref(("x",), S(2, 8, 2, 9)), S(2, 7, 2, 9))
    assert value("--3") == ast.Neg(ast.Neg(ast.Int(3, S(2, 9, 2, 10)), S(2, 8, 2, 10)),
                                   S(2, 7, 2, 10))


def test_comments_are_ignored_everywhere():
    stmts = body("""\
        model m { # the model
          a = 1 /* inline */ + 2
          /* multi
             line */
          b = a
        }
    """)
    assert [s.name for s in stmts] == ["a", "b"]
    assert stmts[0].value.op == "+"
    assert stmts[1].span == S(5, 3, 5, 8)


def test_non_ascii_name_is_an_unexpected_character():
    # a tab counts as one column; 'ä' is not a NAME character
    d = err("model m {\n\tä = 1\n}\n")
    assert (d.code, d.span.line, d.span.col) == ("E002", 2, 2)
    assert d.message == "unexpected character 'ä'"


# ---- syntax errors -----------------------------------------------------------------------


@pytest.mark.parametrize("word", ["import", "extends", "for", "block", "return", "true",
                                  "false"])
def test_keywords_are_reserved_everywhere(word):
    # the lexer does not depend on the parser state: a keyword is never a name,
    # also where nothing but a name can follow
    for text, col in ((f"model {word} {{ }}", 7), (f"model m {{ x = a.{word} }}", 17)):
        d = err(text)
        assert (d.code, d.span.line, d.span.col) == ("E002", 1, col), (text, d.message)
        assert d.message.startswith(f"unexpected '{word}'"), d.message


def test_unexpected_token_lists_what_was_expected():
    d = err("""\
        model m {
          a = 1 +
        }
    """)
    assert d.code == "E002"
    assert d.span == S(3, 1, 3, 2)
    assert d.message == ("unexpected '}'; expected one of '(', '-', '[', 'false', 'true', "
                         "a name, a number, a string, an integer")


def test_unexpected_token_with_a_single_expectation():
    d = err("model m {\n  block b(x {\n")
    assert (d.code, d.span.line, d.span.col) == ("E002", 2, 13)
    assert d.message == "unexpected '{'; expected one of ')', ','"
    d = err("import base\n")
    assert d.span == S(1, 8, 1, 12)
    assert d.message == "unexpected 'base'; expected a string"


def test_assigning_to_an_expression_hints_at_names():
    d = err("""\
        model m {
          a = 1 = 2
        }
    """)
    assert d.code == "E002"
    assert d.span == S(2, 9, 2, 10)
    assert d.message.startswith("unexpected '='")
    assert d.hint == "only a name can be assigned to"


def test_unexpected_character():
    d = err("model m {\n  a = 1 $ 2\n}\n")
    assert (d.code, d.span) == ("E002", S(2, 9, 2, 10))
    assert d.message == "unexpected character '$'"


def test_unprintable_character_is_named_by_code_point():
    d = err("model m {\n  a = 1\x07\n}\n")
    assert (d.code, d.span.line, d.span.col) == ("E002", 2, 8)
    assert d.message == "unexpected character U+0007"


def test_unexpected_end_of_file():
    d = err("model m {\n  a = 1\n")
    assert d.code == "E002"
    assert d.span == S(3, 1, 3, 2)  # just past the last character
    assert d.message.startswith("unexpected end of file")
    assert d.hint == "is a '}' or ')' missing?"
    d = err("import")
    assert d.span == S(1, 7, 1, 8)
    assert d.message == "unexpected end of file; expected a string"
    # after an operand too many tokens could follow to list them
    d = err("model m {\n  a = f(1")
    assert d.span == S(2, 10, 2, 11)
    assert d.message == "unexpected end of file"


def test_unterminated_string_is_E003_at_the_quote():
    d = err('model m {\n  a = "abc\n}\n')
    assert (d.code, d.span) == ("E003", S(2, 7, 2, 8))
    assert d.message == "unterminated string"


@pytest.mark.parametrize("src, col", [
    ("model m {\n  a = 1 /* never closed\n}\n", 9),  # after an operand ('/' is division)
    ("model m {\n  /* never closed\n}\n", 3),  # where a statement starts
    ("model m {\n  a = 2\n  /* x */ b = 1 /* open\n}\n", 17),
])
def test_unterminated_block_comment_is_E003_at_its_start(src, col):
    d = err(src)
    assert (d.code, d.span.line, d.span.col) == ("E003", src.count("\n", 0, src.rindex("/*")) + 1, col)
    assert d.message == "unterminated block comment"
    assert d.hint == "block comments end with '*/'"


def test_slash_star_outside_a_comment_is_still_a_plain_syntax_error():
    d = err("model m {\n  b = 2 / * 3\n}\n")
    assert (d.code, d.span.line, d.span.col) == ("E002", 2, 11)
    assert d.message.startswith("unexpected '*'")


def test_long_tokens_are_shortened_in_messages():
    long = '"' + "x" * 60 + '"'
    d = err(f"model m {{\n  a = 1 {long}\n}}\n")
    assert (d.code, d.span) == ("E002", S(2, 9, 2, 71))
    assert d.message == "unexpected '\"" + "x" * 36 + "...'"


# ---- the expression-depth limit ---------------------------------------------------------


def test_depth_limit_is_exactly_max_expr_depth():
    ok = value("-" * MAX_EXPR_DEPTH + "1")
    depth = 0
    while isinstance(ok, ast.Neg):
        ok, depth = ok.operand, depth + 1
    assert depth == MAX_EXPR_DEPTH

    d = err("model m {\n  a = " + "-" * (MAX_EXPR_DEPTH + 1) + "1\n}\n")
    assert d.code == "E005"
    assert d.message == f"expression nested deeper than {MAX_EXPR_DEPTH} levels"
    # reported at the first node beyond the limit
    assert (d.span.line, d.span.col) == (2, 7 + MAX_EXPR_DEPTH + 1)
    assert d.hint == "split it into named parameters"


@pytest.mark.parametrize("expr", [
    "1" + " + 1" * 200,
    "[" * 100 + "]" * 100,
    "f(" * 100 + ")" * 100,
    "-" * 20_000 + "1",
])
def test_deep_expressions_are_refused_without_exhausting_the_stack(expr):
    d = err(f"model m {{\n  a = {expr}\n}}\n")
    assert (d.code, d.span.line) == ("E005", 2)


def test_parentheses_alone_do_not_nest_the_tree():
    assert value("(" * 500 + "1" + ")" * 500) == ast.Int(1, S(2, 507, 2, 508))


# ---- the generated parser module ----------------------------------------------


def test_grammar_is_strict_lalr():
    # grammar_lalr.py is built without lark's strict mode; building the grammar
    # here with it proves it has no shift/reduce or terminal collisions
    from lark import Lark

    grammar = (ROOT / "compiler" / "grammar.lark").read_text(encoding="utf-8")
    Lark(grammar, parser="lalr", lexer="basic", strict=True, propagate_positions=True)


def _grammar_facts(parser) -> tuple:
    """What the LALR tables are built from: every rule with its options, every
    terminal with its pattern, and the parser options the tables depend on."""
    rules = sorted((r.origin.name, tuple(s.name for s in r.expansion), r.alias, r.order,
                    repr(r.options)) for r in parser.rules)
    terminals = sorted((t.name, type(t.pattern).__name__, t.pattern.value,
                        tuple(sorted(t.pattern.flags)), t.priority) for t in parser.terminals)
    o = parser.options
    return rules, terminals, (o.parser, o.lexer, o.propagate_positions, o.maybe_placeholders,
                              sorted(parser.lexer_conf.ignore))


def test_generated_parser_is_current():
    # lark's standalone output is not byte-stable across runs (set order), so
    # compare what its tables derive from with the grammar as it is now
    from lark import Lark

    from forgec.compiler.parse import _parser

    grammar = (ROOT / "compiler" / "grammar.lark").read_text(encoding="utf-8")
    fresh = Lark(grammar, parser="lalr", lexer="basic", propagate_positions=True,
                 maybe_placeholders=False)
    assert _grammar_facts(_parser()) == _grammar_facts(fresh), \
        "compiler/grammar_lalr.py is stale: run `make parser` after editing grammar.lark"


def test_loading_the_parser_leaves_regex_importable():
    # compiler.parse hides `regex` while the generated module loads; it must not
    # stay hidden from the rest of the process
    code = textwrap.dedent("""\
        import importlib.util, sys
        import forgec.compiler.parse
        assert "regex" not in sys.modules
        if importlib.util.find_spec("regex") is not None:
            import regex
            assert regex.match("a", "a")
        print("ok")
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout == "ok\n", proc.stderr
