"""compiler/resolve.py: imports, the section table, `extends` and block merging."""

from __future__ import annotations

import os

from conftest import codes

from forgec.compiler import ast
from forgec.compiler.diagnostics import Diagnostics
from forgec.compiler.resolve import load_program

# A complete, valid model; `{name}` is substituted. 12 lines.
MODEL = """\
model {name} {{
  dim = 64
  hidden = 128
  token_embedding = embedding(256, dim)
  block dense(x) {{
    n1 = rmsnorm(dim)
    mlp = swiglu(dim, hidden = hidden)
    return x + mlp(n1(x))
  }}
  layers = stack(2) {{ default: dense }}
  norm = rmsnorm(dim)
  output_head = lm_head(dim, 256)
}}
"""
BASE = MODEL.format(name="base")  # lines 1-13


def model(name: str) -> str:
    return MODEL.format(name=name)


def located(diags: Diagnostics, severity: str = "error") -> list[tuple[str, str, int, int]]:
    """(code, file name, line, col) of each diagnostic."""
    return [(d.code, os.path.basename(d.span.file), d.span.line, d.span.col)
            for d in diags.sorted() if d.severity == severity]


def load(tmp_path, text: str, extra: dict[str, str] | None = None):
    for rel, body in (extra or {}).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)
    root = tmp_path / "spec.forge"
    root.write_text(text)
    diags = Diagnostics()
    return load_program(str(root), diags), diags


# ---- imports -----------------------------------------------------------------------------


def test_import_is_relative_to_the_importing_file(tmp_path, forge):
    result, diags = forge('import "sub/b.forge"\n' + model("a"), extra={
        "sub/b.forge": 'import "c.forge"\n',
        "sub/c.forge": model("c"),
    })
    assert diags.items == []
    assert [os.path.relpath(s.abspath, tmp_path) for s in result.program.sources] == [
        "spec.forge", os.path.join("sub", "b.forge"), os.path.join("sub", "c.forge")]
    assert "c" in result.program.sections
    # only the root file's sections are compiled as models
    assert result.program.root_sections == ["a"]
    assert list(result.models) == ["a"]


def test_import_may_go_up_while_staying_inside_the_root_folder(tmp_path, forge):
    result, diags = forge('import "sub/b.forge"\n' + model("a"), extra={
        "sub/b.forge": 'import "../c.forge"\n',
        "c.forge": model("c"),
    })
    assert diags.items == []
    assert "c" in result.program.sections


def test_diamond_import_loads_the_shared_file_once(tmp_path):
    program, diags = load(tmp_path, 'import "b.forge"\nimport "c.forge"\n' + model("a"), extra={
        "b.forge": 'import "d.forge"\n',
        "c.forge": 'import "./d.forge"\n',
        "d.forge": model("d"),
    })
    assert diags.items == []  # in particular, no E020 for 'd' seen twice
    assert [os.path.basename(s.path) for s in program.sources] == [
        "spec.forge", "b.forge", "d.forge", "c.forge"]
    assert set(program.sections) == {"a", "d"}


def test_import_cycle_is_E011_at_the_import_that_closes_it(tmp_path, forge):
    _, diags = forge('import "b.forge"\n' + model("a"), extra={
        "b.forge": '# b\nimport "c.forge"\n',
        "c.forge": '\n\nimport "b.forge"\n',
    })
    assert located(diags) == [("E011", "c.forge", 3, 1)]
    assert diags.errors[0].message == "import cycle: 'b.forge' imports this file again"


def test_importing_the_root_back_is_a_cycle(tmp_path, forge):
    _, diags = forge('import "b.forge"\n' + model("a"), extra={"b.forge": '\nimport "spec.forge"\n'})
    assert located(diags) == [("E011", "b.forge", 2, 1)]


def test_a_file_importing_itself_is_a_cycle(forge):
    _, diags = forge('\n  import "spec.forge"\n' + model("a"))
    assert codes(diags) == [("E011", 2, 3)]


def test_import_leaving_the_root_folder_is_E012(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "outside.forge").write_text(model("o"))
    (inner / "spec.forge").write_text(
        'import "../outside.forge"\nimport "/etc/hosts"\nimport "sub/../../outside.forge"\n'
        + model("a"))
    diags = Diagnostics()
    load_program(str(inner / "spec.forge"), diags)
    assert codes(diags) == [("E012", 1, 1), ("E012", 2, 1), ("E012", 3, 1)]
    assert diags.errors[0].message == "import '../outside.forge' leaves the root spec's folder"


def test_escape_is_judged_against_the_root_not_the_importer(tmp_path, forge):
    # sub/b.forge may import ../c.forge (inside the root), but not ../../x
    _, diags = forge('import "sub/b.forge"\n' + model("a"), extra={
        "sub/b.forge": '\n\nimport "../../x.forge"\n'})
    assert located(diags) == [("E012", "b.forge", 3, 1)]


def test_missing_import_is_E010_at_the_import(forge):
    _, diags = forge('# header\n   import "nope.forge"\n' + model("a"))
    assert codes(diags) == [("E010", 2, 4)]
    d = diags.errors[0]
    assert d.message.startswith("cannot import 'nope.forge': no such file: ")
    assert d.message.endswith("nope.forge'")


def test_importing_a_directory_is_E010(tmp_path, forge):
    (tmp_path / "dir.forge").mkdir()
    _, diags = forge('import "dir.forge"\n' + model("a"))
    assert codes(diags) == [("E010", 1, 1)]


def test_syntax_error_in_an_imported_file_is_located_there(forge):
    _, diags = forge('import "b.forge"\n' + model("a"), extra={"b.forge": "model q {\n  a =\n}\n"})
    assert located(diags) == [("E002", "b.forge", 3, 1)]


def test_independent_import_errors_are_all_reported(forge):
    _, diags = forge('import "x.forge"\nimport "../y.forge"\nimport "spec.forge"\n' + model("a"))
    assert codes(diags) == [("E010", 1, 1), ("E012", 2, 1), ("E011", 3, 1)]


# ---- the section table ----------------------------------------------------------------------


def test_duplicate_section_is_E020_with_a_note_at_the_first(forge):
    _, diags = forge('import "b.forge"\n' + model("a"), extra={"b.forge": "\n\n" + model("a")})
    assert located(diags) == [("E020", "spec.forge", 2, 7)]
    d = diags.errors[0]
    assert d.message == "'a' is defined twice"
    ((note, span),) = d.notes
    assert note == "first defined here"
    assert (os.path.basename(span.file), span.line, span.col) == ("b.forge", 3, 7)


def test_duplicate_section_in_one_file(forge):
    _, diags = forge(model("a") + "\n" + model("a"))
    assert codes(diags) == [("E020", 15, 7)]
    assert diags.errors[0].notes[0][1].line == 1


def test_unknown_section_kind_is_E013_with_a_suggestion(forge):
    _, diags = forge("modle x { }\nvison y { }\n  foo z { }\n" + model("a"))
    assert codes(diags) == [("E013", 1, 1), ("E013", 2, 1), ("E013", 3, 3)]
    modle, vison, foo = diags.errors
    assert modle.message == "unknown section kind 'modle'"
    assert modle.hint == "did you mean 'model'?"
    assert vison.hint == "did you mean 'vision'?"
    assert foo.hint == "sections are: model, vision, vlm, plan"


def test_duplicate_declaration_in_a_section_is_E020(forge):
    _, diags = forge(BASE.replace("  hidden = 128\n", "  hidden = 128\n  dim = 32\n"))
    assert codes(diags) == [("E020", 4, 3)]
    d = diags.errors[0]
    assert d.message == "'dim' is defined twice"
    assert [(n, s.line, s.col) for n, s in d.notes] == [("first defined here", 2, 3)]


def test_duplicate_block_and_block_name_clashes(forge):
    _, diags = forge("""\
        model m {
          dim = 64
          block b(x) { return x }
          block b(x) { return x }
          dense = 3
          block dense(x) { return x }
          block c(x, x) { return x }
        }
    """)
    assert codes(diags) == [("E020", 4, 9), ("E020", 6, 9), ("E020", 7, 14)]
    twice, clash, inputs = diags.errors
    assert twice.message == "block 'b' is defined twice"
    assert [(s.line, s.col) for _, s in twice.notes] == [(3, 9)]
    assert clash.message == "block 'dense' clashes with a declaration of the same name"
    assert [(s.line, s.col) for _, s in clash.notes] == [(5, 3)]
    assert inputs.message == "input 'x' is listed twice"


def test_declaration_named_like_an_earlier_block_is_E020(forge):
    _, diags = forge("model m {\n  block b(x) { return x }\n  b = 1\n}\n")
    assert codes(diags) == [("E020", 3, 3)]
    assert diags.errors[0].message == "'b' is already a block"


def test_return_outside_a_block_and_block_without_return(forge):
    _, diags = forge("model m {\n  return 1\n  block b(x) { y = x }\n}\n")
    assert codes(diags) == [("E050", 2, 3), ("E050", 3, 9)]
    assert diags.errors[1].message == "block 'b' has no 'return'"


def test_block_statement_errors(forge):
    _, diags = forge("""\
        model m {
          block b(x) {
            block c(y) { return y }
            layers = stack(2) { default: c }
            f(x)
            y = x
            y = x + x
            return y
            return x
          }
        }
    """)
    assert codes(diags) == [("E045", 3, 11), ("E045", 4, 5), ("E053", 5, 5), ("E020", 7, 5),
                            ("E050", 9, 5)]


# ---- dataflow / declaration split -------------------------------------------------------------


def test_block_statements_split_into_declarations_and_dataflow(tmp_path):
    program, diags = load(tmp_path, BASE.replace(
        "    return x + mlp(n1(x))\n",
        "    k = dim * 2\n    h = n1(x)\n    g = mlp(h) + h\n    return g\n"))
    assert diags.items == []
    block = program.sections["base"].blocks["dense"]
    assert list(block.decls) == ["n1", "mlp", "k"]
    assert [f.name for f in block.flow] == ["h", "g"]
    assert isinstance(block.ret, ast.Return)
    assert block.inputs[0][0] == "x"
    assert block.owner == "base"


# ---- extends ----------------------------------------------------------------------------------


def test_extends_merges_declarations_by_name(tmp_path):
    program, diags = load(tmp_path, BASE + """\
model d extends base {
  dim = 128
}
""")
    assert diags.items == []
    d = program.sections["d"]
    assert d.base == "base"
    assert list(d.decls) == list(program.sections["base"].decls)
    assert d.decls["dim"].value.value == 128
    assert d.decls["hidden"] is program.sections["base"].decls["hidden"]
    assert d.origin["dim"] == "d" and d.origin["hidden"] == "base"
    assert d.blocks["dense"] is program.sections["base"].blocks["dense"]


def test_extends_a_base_from_an_import(forge):
    result, diags = forge('import "b.forge"\nmodel d extends base {\n  dim = 32\n}\n',
                          extra={"b.forge": BASE})
    assert diags.items == []
    assert result.models["d"].params["dim"] == 32
    assert result.models["d"].components["token_embedding"].args["dim"] == 32


def test_unknown_base_is_E040_with_a_suggestion(forge):
    _, diags = forge(BASE + "model d extends bsae {\n}\nmodel e extends zzz {\n}\n")
    assert codes(diags) == [("E040", 14, 17), ("E040", 16, 17)]
    typo, other = diags.errors
    assert typo.message == "unknown base 'bsae'"
    assert typo.hint == "did you mean 'base'?"
    assert other.hint == "import the file that defines it"


def test_base_of_another_kind_is_E040(forge):
    _, diags = forge(BASE + "plan p for base {\n}\nmodel d extends p {\n}\n")
    assert codes(diags) == [("E040", 16, 17)]
    assert diags.errors[0].message == "'d' is a model but its base 'p' is a plan"


def test_extends_cycles_are_E042(forge):
    _, diags = forge(BASE + """\
model c1 extends c2 {
}
model c2 extends c1 {
}
model s extends s {
}
""")
    # one error per cycle, at the `extends` that closes it
    assert codes(diags) == [("E042", 16, 18), ("E042", 18, 17)]
    assert diags.errors[0].message == "'c2' extends itself through 'c1'"
    assert diags.errors[1].message == "'s' extends itself through 's'"


def test_longer_extends_cycle_is_reported_once(forge):
    _, diags = forge(BASE + "model a extends b {\n}\nmodel b extends c {\n}\nmodel c extends a {\n}\n")
    assert codes(diags) == [("E042", 18, 17)]


def test_overriding_a_name_the_base_lacks_is_E041(forge):
    _, diags = forge(BASE + """\
model d extends base {
  hiden = 256
}
""")
    assert codes(diags) == [("E041", 15, 3)]
    d = diags.errors[0]
    assert d.message == "'d' overrides 'hiden', which its base 'base' does not have"
    assert d.hint == "did you mean 'hidden'?"


def test_new_name_that_the_derived_model_uses_is_accepted(forge):
    result, diags = forge(BASE + """\
model d extends base {
  mult = 4
  hidden = dim * mult
}
""")
    assert diags.items == []
    assert result.models["d"].params["hidden"] == 256
    assert result.models["d"].blocks["dense"].components["mlp"].args["hidden"] == 256


def test_new_name_used_only_by_a_new_block_is_accepted(forge):
    result, diags = forge(BASE + """\
model d extends base {
  wide = 512
  block big(x) {
    mlp = swiglu(dim, hidden = wide)
    return x + mlp(x)
  }
  layers = stack(2) { default: dense  last 1: big }
}
""")
    assert codes(diags, None) == []
    assert [s.block for s in result.models["d"].layers] == ["dense", "big"]


# ---- block overrides ---------------------------------------------------------------------------


def test_block_override_merges_components_by_name_and_keeps_the_dataflow(forge):
    result, diags = forge(BASE + """\
model d extends base {
  block dense(x) {
    mlp = swiglu(dim, hidden = 512)
  }
}
""")
    assert codes(diags, None) == []
    base, d = result.program.sections["base"], result.program.sections["d"]
    assert list(d.blocks["dense"].decls) == ["n1", "mlp"]
    assert d.blocks["dense"].decls["n1"] is base.blocks["dense"].decls["n1"]
    assert d.blocks["dense"].ret is base.blocks["dense"].ret
    assert d.blocks["dense"].owner == "d"
    # the base is untouched
    assert result.program.sections["base"].blocks["dense"].decls["mlp"].value.args[1].value.parts \
        == ("hidden",)
    block = result.models["d"].blocks["dense"]
    assert block.components["mlp"].args["hidden"] == 512


def test_block_override_with_dataflow_replaces_it_as_a_whole(forge):
    result, diags = forge(BASE + """\
model d extends base {
  block dense(x) {
    n2 = layernorm(dim)
    h = n2(x)
    return x + mlp(h)
  }
}
""")
    # the inherited n1 is no longer applied by the new dataflow
    assert codes(diags, "warning") == [("W002", 6, 5)]
    assert codes(diags) == []
    sec = result.program.sections["d"].blocks["dense"]
    assert list(sec.decls) == ["n1", "mlp", "n2"]
    assert [f.name for f in sec.flow] == ["h"]
    assert sec.ret.span.line == 18
    block = result.models["d"].blocks["dense"]
    assert block.components["n2"].op.name == "layernorm"


def test_block_override_adding_an_unused_component_is_E041(forge):
    _, diags = forge(BASE + """\
model d extends base {
  block dense(x) {
    mlp = swiglu(dim, hidden = 512)
    n2 = rmsnorm(dim)
  }
}
""")
    assert codes(diags) == [("E041", 17, 5)]
    assert diags.errors[0].message == \
        "block 'dense' overrides 'n2', which the inherited block does not have"


def test_block_override_with_different_inputs_is_E044(forge):
    _, diags = forge(BASE + """\
model d extends base {
  block dense(y) {
    mlp = swiglu(dim, hidden = 512)
  }
}
""")
    assert codes(diags) == [("E044", 15, 9)]
    assert diags.errors[0].message == "block 'dense' takes (y) but its base takes (x)"


def test_block_override_cannot_also_extend(forge):
    _, diags = forge(BASE + """\
model d extends base {
  block dense(x) extends dense {
    mlp = swiglu(dim, hidden = 512)
  }
}
""")
    assert codes(diags) == [("E043", 15, 26)]


def test_block_extends_another_block(forge):
    result, diags = forge(BASE.replace(
        "  layers = stack(2) { default: dense }\n",
        "  block wide(x) extends dense {\n"
        "    mlp = swiglu(dim, hidden = 512)\n"
        "  }\n"
        "  layers = stack(2) { default: dense  last 1: wide }\n"))
    assert codes(diags, None) == []
    dense, wide = result.models["base"].blocks["dense"], result.models["base"].blocks["wide"]
    assert list(wide.components) == ["n1", "mlp"]
    assert wide.components["mlp"].args["hidden"] == 512
    assert dense.components["mlp"].args["hidden"] == 128
    assert wide.ret == dense.ret
    assert wide.inputs == ("x",)
    assert [s.block for s in result.models["base"].layers] == ["dense", "wide"]


def test_block_extends_in_a_derived_model(forge):
    result, diags = forge(BASE + """\
model d extends base {
  block wide(x) extends dense {
    mlp = swiglu(dim, hidden = 512)
  }
  layers = stack(2) { default: wide }
}
""")
    # dense is no longer stacked in d, but W003 is the base's business, not d's
    assert codes(diags, None) == []
    d = result.models["d"]
    assert d.blocks["wide"].components["mlp"].args["hidden"] == 512


def test_block_extends_unknown_block_is_E040(forge):
    _, diags = forge("model m {\n  block b(x) extends dnese { return x }\n  block dense(x) { return x }\n}\n")
    assert codes(diags) == [("E040", 2, 22)]
    assert diags.errors[0].message == "unknown base block 'dnese'"


def test_block_extends_with_other_inputs_is_E044(forge):
    _, diags = forge(BASE.replace(
        "  layers = stack(2) { default: dense }\n",
        "  block wide(y) extends dense {\n  }\n  layers = stack(2) { default: dense }\n"))
    assert codes(diags) == [("E044", 10, 9)]
