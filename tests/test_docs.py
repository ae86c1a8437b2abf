"""docs/language.md stays true: its examples compile, its tables match the registry.

* Every ```forge block is a complete spec that compiles with no error and no
  warning; ```forge file=NAME blocks are, too, and every example can import
  them. ```forge-fragment blocks are not checked.
* The op reference lists every op of `compiler.ops.OPS`, the function
  reference every function of `compiler.functions.FUNCTIONS`, the plan section
  every directive of `compiler.plans.DIRECTIVES`, and the model settings
  table `compiler.bind.SETTINGS`, each argument with its type, default and
  range, in the registry's order (the positional order).
* The ```console blocks show the real output of the commands in them.
* Every `forgec` subcommand is described.
"""

from __future__ import annotations

import re
import textwrap

import pytest
from conftest import ROOT, compile_text, run_forgec

from forgec.compiler.bind import SETTINGS
from forgec.compiler.cli import _parser
from forgec.compiler.functions import FUNCTIONS
from forgec.compiler.ops import OPS, ArgSpec
from forgec.compiler.plans import DIRECTIVES

DOC = ROOT / "docs" / "language.md"
DOC_TEXT = DOC.read_text(encoding="utf-8")
FENCE_RE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
ARG_HEADER = "| argument | type | default | range | meaning |"
SETTING_HEADER = "| setting | type | default | range | meaning |"


def fences(text: str) -> list[tuple[str, str, int]]:
    """(info string, body, line number) of every fenced block."""
    return [(m.group("info").strip(), m.group("body"), text.count("\n", 0, m.start()) + 1)
            for m in FENCE_RE.finditer(text)]


FENCES = fences(DOC_TEXT)
FILES = {info.split("=", 1)[1]: body for info, body, _ in FENCES
         if info.startswith("forge file=")}
EXAMPLES = [(f"line{line}" + (f"-{info.split('=', 1)[1]}" if "=" in info else ""), info, body)
            for info, body, line in FENCES if info == "forge" or info.startswith("forge file=")]


def test_forge_blocks_are_marked_as_examples_files_or_fragments():
    for info, _, line in FENCES:
        if info.lower().startswith("forge"):
            assert re.fullmatch(r"forge|forge-fragment|forge file=[\w.-]+\.forge", info), \
                f"line {line}: unknown fence {info!r}"
    assert len(EXAMPLES) >= 20  # the reader found the examples


@pytest.mark.parametrize("name, info, body", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_compiles_without_errors_or_warnings(name, info, body, tmp_path):
    own = info.split("=", 1)[1] if info.startswith("forge file=") else "example.forge"
    extra = {f: text for f, text in FILES.items() if f != own}
    result, diags = compile_text(tmp_path, body, name=own, extra=extra)
    shown = [f"{d.severity} {d.code} {d.span.line}:{d.span.col} {d.message}"
             if d.span else f"{d.severity} {d.code} {d.message}" for d in diags.sorted()]
    assert result is not None and diags.error_count == 0, shown
    assert not [d for d in diags.items if d.severity == "warning"], shown
    assert result.models, "an example defines at least one model"


# ---- reference tables ----------------------------------------------------------------


def section(text: str, title: str) -> str:
    """The body of `## title`, up to the next `## ` heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {title}' section"
    return m.group(1)


def cells(line: str) -> list[str]:
    """The cells of a table row; `\\|` is a `|` inside a cell."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def tables(body: str, header: str, required: bool = True) -> dict[str, list[list[str]]]:
    """Rows of the first `header` table after each ### `name` heading."""
    out: dict[str, list[list[str]]] = {}
    parts = re.split(r"^### `([^`]+)`[ \t]*$", body, flags=re.M)
    for name, text in zip(parts[1::2], parts[2::2], strict=True):
        lines = text.splitlines()
        if header not in lines and not required:
            continue
        assert header in lines, f"`{name}` has no argument table"
        rows = []
        for line in lines[lines.index(header) + 2:]:
            if not line.startswith("|"):
                break
            rows.append(cells(line))
        assert name not in out, f"`{name}` documented twice"
        out[name] = rows
    return out


def _num(x: float) -> str:
    return f"{x:g}"


def expected_range(spec: ArgSpec) -> str:
    if spec.choices:
        return ", ".join(f"`{c}`" for c in spec.choices)
    if spec.min is not None and spec.max is not None:
        return f"{_num(spec.min)} … {_num(spec.max)}"
    if spec.min is not None:
        return f"≥ {_num(spec.min)}"
    if spec.max is not None:
        return f"≤ {_num(spec.max)}"
    return ""


def default_matches(spec: ArgSpec, cell: str) -> bool:
    if spec.required:
        return cell == "required"
    if spec.derived:
        return cell.startswith("derived")
    if spec.default is None:
        return cell == "—"
    m = re.fullmatch(r"`([^`]+)`", cell)
    if m is None:
        return False
    lit = m.group(1)
    if spec.type == "bool":
        return lit == ("true" if spec.default else "false")
    if spec.type == "choice":
        return lit == spec.default
    if isinstance(spec.default, str):
        return lit == f'"{spec.default}"'
    if spec.type == "float":  # shown as a float, so that users write one
        return bool(re.search(r"[.eE]", lit)) and float(lit) == spec.default
    return re.fullmatch(r"-?\d+", lit) is not None and int(lit) == spec.default


def check_rows(what: str, specs: tuple[ArgSpec, ...], rows: list[list[str]]) -> None:
    names = [r[0].strip("`") for r in rows]
    assert names == [s.name for s in specs], f"{what}: arguments {names}"
    for spec, (_, type_, default, range_, _meaning) in zip(specs, rows, strict=True):
        assert type_ == spec.type, f"{what}.{spec.name}: type {type_!r}, registry {spec.type!r}"
        assert default_matches(spec, default), \
            f"{what}.{spec.name}: default {default!r}, registry " + (
                "required" if spec.required else "derived" if spec.derived else repr(spec.default))
        assert range_ == expected_range(spec), \
            f"{what}.{spec.name}: range {range_!r}, registry {expected_range(spec)!r}"


def test_op_reference_lists_every_op_with_its_arguments():
    documented = tables(section(DOC_TEXT, "Op reference"), ARG_HEADER)
    assert sorted(documented) == sorted(OPS)
    for name, op in OPS.items():
        check_rows(name, op.args, documented[name])


def test_function_reference_lists_every_function_with_its_arguments():
    documented = tables(section(DOC_TEXT, "Compile-time function reference"), ARG_HEADER)
    assert sorted(documented) == sorted(FUNCTIONS)
    for name, fn in FUNCTIONS.items():
        check_rows(name, fn.args, documented[name])


def test_plan_directives_are_documented_with_their_arguments():
    body = section(DOC_TEXT, "Parallel plans")
    headings = re.findall(r"^### `([^`]+)`", body, re.M)
    assert sorted(headings) == sorted(DIRECTIVES)
    documented = tables(body, ARG_HEADER, required=False)
    for name, d in DIRECTIVES.items():
        # activation_checkpoint's arguments are the model's block kinds: no table
        assert (name in documented) == (not d.open_args), name
        if not d.open_args:
            check_rows(name, d.args, documented[name])


def test_model_settings_table_matches_the_binder():
    body = section(DOC_TEXT, "Models")
    lines = body.splitlines()
    start = lines.index(SETTING_HEADER) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    check_rows("settings", tuple(SETTINGS.values()), rows)


def test_table_checks_catch_drift():
    spec = OPS["rmsnorm"].arg("eps")
    assert default_matches(spec, "`1e-5`") and not default_matches(spec, "`1e-6`")
    assert not default_matches(spec, "required")
    assert expected_range(spec) == "0 … 1"
    with pytest.raises(AssertionError, match="arguments"):
        check_rows("rmsnorm", OPS["rmsnorm"].args, [["`dim`", "size", "required", "", ""]])


# ---- the command line ------------------------------------------------------------------


CONSOLES = [(body, line) for info, body, line in FENCES if info == "console"]


@pytest.mark.parametrize("body, line", CONSOLES, ids=[f"line{ln}" for _, ln in CONSOLES])
def test_console_output_is_what_forgec_prints(body, line, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    runs = re.split(r"^\$ forgec ", body, flags=re.M)[1:]
    assert runs, f"line {line}: a console block shows `$ forgec ...` commands"
    for run in runs:
        command, _, expected = run.partition("\n")
        proc = run_forgec(*command.split(), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected, f"`forgec {command}` printed:\n{proc.stdout}"


def test_every_subcommand_is_documented():
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"forgec {name}" in DOC_TEXT, f"`forgec {name}` is not documented"


def test_exit_codes_are_documented():
    from forgec.compiler import errors

    text = section(DOC_TEXT, "The command line")
    for code in (errors.EXIT_OK, errors.EXIT_SPEC, errors.EXIT_USAGE, errors.EXIT_INTERNAL,
                 errors.EXIT_INTERRUPTED):
        assert f"**{code}**" in text
