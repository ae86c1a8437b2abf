"""docs/errors.md documents every diagnostic, and each example triggers it.

Every `### CODE` section of the doc holds one or more examples:

* a ```forge block (the spec; ```forge root=NAME names its file, default
  spec.forge), optional ```forge file=NAME blocks (more files beside it), then
  `<!-- expect: CODE at [FILE:]LINE:COL [world=N] [also=CODE,...] -->`;
  `world=N` also validates the example's plans for N ranks;
* for diagnostics about bytes or the file system, only
  `<!-- expect: CODE at LINE:COL harness=NAME -->`: HARNESSES writes the file;
* for the importers, a ```json file=NAME (import-hf) or ```toml file=NAME
  (import-kf) config, then `<!-- import-expect: CODE at FILE:LINE:COL -->`.

Each example must report CODE, with its severity, at exactly that position, and
no other code but those after `also=` (examples are minimal). The set of
documented codes must equal the set of codes the compiler's source can emit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import ROOT, compile_text, run_forgec

from forgec.compiler.build import package_name
from forgec.compiler.diagnostics import CompileFailed, Diagnostics, ForgeError
from forgec.compiler.driver import compile_spec
from forgec.compiler.importers.common import JSONSyntaxError, parse_json, parse_toml
from forgec.compiler.importers.hf import import_hf
from forgec.compiler.importers.kf import import_kf
from forgec.compiler.plans import validate
from forgec.compiler.source import MAX_SPEC_BYTES

DOC = ROOT / "docs" / "errors.md"
SOURCE_CODE_RE = re.compile(r'"([EWN]\d{3})"')
HEADING_RE = re.compile(r"^##(?:#)? (?P<title>.*)$", re.M)
CODE_HEADING_RE = re.compile(r"^(?P<code>[EWN]\d{3}) — \S")
ITEM_RE = re.compile(
    r"^```(?P<lang>forge|json|toml)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```[ \t]*$"
    r"|^<!-- (?P<kind>expect|import-expect): (?P<code>[EWN]\d{3}) at "
    r"(?:(?P<file>[\w.-]+\.(?:forge|json|toml)):)?"
    r"(?P<line>\d+):(?P<col>\d+)(?: harness=(?P<harness>[\w-]+))?(?: world=(?P<world>\d+))?"
    r"(?: also=(?P<also>[EWN]\d{3}(?:,[EWN]\d{3})*))? -->[ \t]*$",
    re.M | re.S)
FENCE_RE = re.compile(r"^```forge(?P<attrs>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
SEVERITY = {"E": "error", "W": "warning", "N": "note"}
DEFAULT_ROOT = "spec.forge"


# ---- files the byte-level examples need --------------------------------------------


def _missing_file(path: Path) -> None:
    pass  # nothing is written


def _directory(path: Path) -> None:
    path.mkdir()


def _nul_byte(path: Path) -> None:
    path.write_bytes(b"model tiny {\n  dim = 6\x004\n}\n")


def _latin1(path: Path) -> None:
    path.write_bytes("model tiny {\n  # café\n}\n".encode("latin-1"))


def _too_large(path: Path) -> None:
    line = b"# padding: a generated spec that grew past the limit\n"
    path.write_bytes(line * (MAX_SPEC_BYTES // len(line) + 1))
    assert path.stat().st_size > MAX_SPEC_BYTES


HARNESSES = {
    "missing-file": _missing_file,
    "directory": _directory,
    "nul-byte": _nul_byte,
    "latin1": _latin1,
    "too-large": _too_large,
}


# ---- reading the doc -------------------------------------------------------------------


@dataclass
class Example:
    section: str  # the code of the `## CODE` section it is in
    code: str
    line: int
    col: int
    file: str  # the file the diagnostic is in
    root: str = DEFAULT_ROOT
    text: str | None = None  # None for harness examples
    files: dict[str, str] = field(default_factory=dict)
    harness: str | None = None
    also: frozenset[str] = frozenset()  # other codes the example reports, e.g. W001
    world: int | None = None  # validate the plans for this many ranks
    config: tuple[str, str] | None = None  # (json|toml, text) of an importer example

    @property
    def id(self) -> str:
        return f"{self.code}@{self.file}:{self.line}:{self.col}"


def _attrs(raw: str) -> dict[str, str]:
    out = {}
    for word in raw.split():
        key, sep, value = word.partition("=")
        assert sep and key in ("root", "file") and value, f"bad fence attribute {word!r}"
        out[key] = value
    return out


def sections(doc: str) -> dict[str, str]:
    """`### CODE — title` sections by code (`##` headings only group them)."""
    return {code: body for code, (body, _) in _sections(doc).items()}


def _sections(doc: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Each code's section, and the ```forge file=NAME blocks of its group's
    introduction (the text between a `##` heading and its first `###`), which
    every example of the group can import."""
    out: dict[str, tuple[str, dict[str, str]]] = {}
    heads = list(HEADING_RE.finditer(doc))
    shared: dict[str, str] = {}
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(doc)
        m = CODE_HEADING_RE.match(h.group("title"))
        if m is None:
            if doc[h.start():h.start() + 3] == "## ":  # a group: its introduction
                shared = {attrs["file"]: f.group("body") for f in FENCE_RE.finditer(doc[h.end():end])
                          if "file" in (attrs := _attrs(f.group("attrs")))}
            continue
        assert m.group("code") not in out, f"{m.group('code')} documented twice"
        out[m.group("code")] = (doc[h.end():end], shared)
    return out


def examples(doc: str) -> list[Example]:
    out: list[Example] = []
    for section, (body, shared) in _sections(doc).items():
        root: tuple[str, str] | None = None
        files: dict[str, str] = dict(shared)
        configs: dict[str, tuple[str, str]] = {}
        for m in ITEM_RE.finditer(body):
            if m.group("body") is not None:
                attrs = _attrs(m.group("attrs"))
                if m.group("lang") != "forge":
                    assert "file" in attrs, f"{section}: a config block names its file"
                    configs[attrs["file"]] = (m.group("lang"), m.group("body"))
                elif "file" in attrs:
                    files[attrs["file"]] = m.group("body")
                else:
                    assert root is None, f"{section}: two specs before one expect comment"
                    root = (attrs.get("root", DEFAULT_ROOT), m.group("body"))
                continue
            line, col = int(m.group("line")), int(m.group("col"))
            also = frozenset((m.group("also") or "").split(",")) - {""}
            if m.group("kind") == "import-expect":
                assert root is None and files == shared and len(configs) == 1 \
                    and m.group("file") in configs, \
                    f"{section}: an import-expect comment follows one config file it names"
                out.append(Example(section, m.group("code"), line, col, m.group("file"),
                                   m.group("file"), also=also, config=configs[m.group("file")]))
            else:
                harness = m.group("harness")
                assert not configs and (root is None) == (harness is not None), \
                    f"{section}: an expect comment follows a spec, or names a harness"
                name = root[0] if root else DEFAULT_ROOT
                out.append(Example(section, m.group("code"), line, col, m.group("file") or name,
                                   name, root[1] if root else None, files, harness, also,
                                   int(m.group("world")) if m.group("world") else None))
            root, files, configs = None, dict(shared), {}
        assert root is None and files == shared and not configs, \
            f"{section}: a ```forge, ```json or ```toml block without an expect comment"
    return out


DOC_TEXT = DOC.read_text(encoding="utf-8")
EXAMPLES = examples(DOC_TEXT)


def import_example(ex: Example) -> Diagnostics:
    """What `forgec import-hf` / `import-kf` report for the example's config."""
    lang, text = ex.config
    diags = Diagnostics()
    try:
        src = (parse_json if lang == "json" else parse_toml)(text, ex.root)
    except JSONSyntaxError as e:
        diags.error("E110", str(e), e.span)
    else:
        (import_hf if lang == "json" else import_kf)(src, "m", ex.root, diags)
    return diags


def compile_example(ex: Example, tmp_path: Path) -> Diagnostics:
    if ex.config is not None:
        return import_example(ex)
    if ex.harness is None:
        result, diags = compile_text(tmp_path, ex.text, name=ex.root, extra=ex.files)
    else:
        path = tmp_path / ex.root
        HARNESSES[ex.harness](path)
        diags = Diagnostics()
        try:
            result = compile_spec(str(path), diags)
        except CompileFailed:
            result = None
    if result is not None and ex.world is not None:
        # what running a plan on `world` ranks checks first
        for plan in result.plans.values():
            validate(plan, result.models[plan.target], result.graphs[plan.target], diags,
                     world=ex.world)
    if result is not None:
        # what `forgec info`, `graph` and `build` do next: pick the model and
        # (build) name the package after the spec
        for step in (result.main_model, lambda: package_name(result.program.root)):
            try:
                step()
            except ForgeError as e:
                diags.add(e.diagnostic)
    return diags


def _show(diags: Diagnostics) -> str:
    return "\n".join(f"  {d.severity} {d.code} "
                     f"{os.path.basename(d.span.file) + ':' if d.span else ''}"
                     f"{d.span.line if d.span else '-'}:{d.span.col if d.span else '-'} {d.message}"
                     for d in diags.sorted()) or "  (no diagnostics)"


# ---- the examples ------------------------------------------------------------------------


def hits(ex: Example, diags: Diagnostics) -> list:
    """The diagnostics that are exactly what `ex` promises."""
    return [d for d in diags.items
            if d.code == ex.code and d.severity == SEVERITY[ex.code[0]] and d.span is not None
            and os.path.basename(d.span.file) == ex.file
            and (d.span.line, d.span.col) == (ex.line, ex.col)]


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda ex: ex.id)
def test_example_reports_its_code_at_the_documented_place(ex, tmp_path):
    diags = compile_example(ex, tmp_path)
    assert hits(ex, diags), (f"expected {SEVERITY[ex.code[0]]} {ex.code} at "
                             f"{ex.file}:{ex.line}:{ex.col}; got\n" + _show(diags))
    codes = {d.code for d in diags.items}
    assert codes == {ex.code} | ex.also, \
        f"the {ex.code} example should report {sorted({ex.code} | ex.also)}:\n{_show(diags)}"


# ---- the doc's structure -----------------------------------------------------------------


def emitted_codes() -> dict[str, list[str]]:
    """Every code that appears as a string literal in compiler/, with where."""
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "compiler").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for code in SOURCE_CODE_RE.findall(line):
                out.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{n}")
    return out


def test_every_code_the_compiler_emits_is_documented():
    emitted = emitted_codes()
    assert len(emitted) > 40  # the scan itself works
    missing = sorted(set(emitted) - set(sections(DOC_TEXT)))
    assert not missing, "undocumented codes: " + ", ".join(f"{c} ({emitted[c][0]})"
                                                            for c in missing)


def test_every_documented_code_is_emitted_by_the_compiler():
    stale = sorted(set(sections(DOC_TEXT)) - set(emitted_codes()))
    assert not stale, f"documented but never emitted: {stale}"


def test_every_code_has_an_example_of_its_own():
    by_section: dict[str, set[str]] = {}
    for ex in EXAMPLES:
        assert ex.code == ex.section, f"an {ex.code} example in the {ex.section} section"
        by_section.setdefault(ex.section, set()).add(ex.code)
    without = sorted(set(sections(DOC_TEXT)) - set(by_section))
    assert not without, f"codes without an example: {without}"


def test_every_example_and_expect_comment_is_read():
    # a malformed fence or comment would otherwise drop an example silently
    assert len(re.findall(r"^<!-- (import-)?expect:", DOC_TEXT, re.M)) == len(EXAMPLES)
    groups = {id(files): len(files) for _, files in _sections(DOC_TEXT).values()}
    shared = {ex.section: set(_sections(DOC_TEXT)[ex.section][1]) for ex in EXAMPLES}
    own = sum((ex.text is not None) + len(set(ex.files) - shared[ex.section])
              + (ex.config is not None) for ex in EXAMPLES)
    assert len(re.findall(r"^```(forge|json|toml)", DOC_TEXT, re.M)) == own + sum(groups.values())


def test_harnesses_are_all_used_and_known():
    used = {ex.harness for ex in EXAMPLES if ex.harness}
    assert used == set(HARNESSES)


def test_a_wrong_position_or_code_in_the_doc_would_fail(tmp_path):
    ex = next(e for e in EXAMPLES if e.code == "E070")
    diags = compile_example(ex, tmp_path)
    assert hits(ex, diags)
    for wrong in (replace(ex, col=ex.col + 1), replace(ex, line=ex.line - 1),
                  replace(ex, code="E071"), replace(ex, file="other.forge")):
        assert not hits(wrong, diags)


def test_the_doc_reader_pairs_specs_files_and_comments():
    doc = """
## Group
### E011 — import cycle
```forge root=a.forge
import "b.forge"
```
```forge file=b.forge
import "a.forge"
```
<!-- expect: E011 at b.forge:1:1 -->
### E001 — file not found
<!-- expect: E001 at 1:1 harness=missing-file -->
"""
    doc += """### E112 — missing field
```toml file=model.toml
[train]
```
<!-- import-expect: E112 at model.toml:1:1 -->
"""
    (cycle, missing, config) = examples(doc)
    assert (config.config, config.file, config.text) == (("toml", "[train]\n"), "model.toml", None)
    assert (cycle.section, cycle.root, cycle.file, cycle.line, cycle.col) == \
        ("E011", "a.forge", "b.forge", 1, 1)
    assert cycle.text == 'import "b.forge"\n' and cycle.files == {"b.forge": 'import "a.forge"\n'}
    assert (missing.harness, missing.text, missing.file) == ("missing-file", None, "spec.forge")
    with pytest.raises(AssertionError, match="without an expect comment"):
        examples("### E002 — syntax\n```forge\nmodel m {\n```\n")


def test_forgec_info_reports_a_spec_without_a_model_as_a_spec_error(tmp_path):
    ex = next(e for e in EXAMPLES if e.code == "E006" and e.text.startswith("vision"))
    (tmp_path / ex.root).write_text(ex.text)
    for command in ("info", "graph"):
        proc = run_forgec(command, ex.root, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert f"{ex.root}:{ex.line}:{ex.col}: error[E006]" in proc.stderr
        assert "internal error" not in proc.stderr
