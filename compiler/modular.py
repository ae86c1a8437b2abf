"""Copy op code from compiler/ops/*/modules.py into a generated model.py.

An op's PyTorch code is a real module (importable, linted, unit-tested); a
generated model is one self-contained file. Like transformers' modular
converter, this reads the modules as text (the compiler never imports torch)
and copies the definitions a model needs, each after the definitions it uses.

Specialisation is static and visible in the op source:

* a module-level flag `QK_NORM = True  # feature: ...` names a feature (here
  `qk_norm`); the flag line itself is never copied;
* `if QK_NORM:` (or any `and` / `or` / `not` of flags and other conditions) is
  evaluated with the model's features: a true flag drops the test (and the
  body is dedented, or the test keeps only its other conditions), a false one
  drops the branch, so the copy has no dead branch;
* a line ending in `# if FLAG-EXPRESSION` is kept only where it holds (for
  parameters and other lines that are not statements).

Copied definitions keep their comments; imports are left behind (the model
file has its own, and cross-op imports become plain references).
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from functools import cache

from .ops import OPS_DIR

FLAG_RE = re.compile(r"^([A-Z][A-Z0-9_]*) = True  # feature\b")
PRAGMA_RE = re.compile(r"  # if (.+)$")


def flag_name(feature: str) -> str:
    """The module flag of a feature: `qk_norm` → `QK_NORM`."""
    return feature.upper()


@dataclass(frozen=True)
class Definition:
    name: str
    family: str
    lines: tuple[str, ...]  # the source lines, with attached comments above
    first: int  # 1-based line number of lines[0] in the file
    node: ast.stmt


@dataclass(frozen=True)
class _Module:
    family: str
    text: str
    flags: frozenset[str]
    definitions: tuple[Definition, ...]


@cache
def _module(family: str) -> _Module:
    path = os.path.join(OPS_DIR, family, "modules.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()
    tree = ast.parse(text, filename=path)
    flags = frozenset(m.group(1) for line in lines if (m := FLAG_RE.match(line)))
    defs = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            name = node.name
            start = min([node.lineno, *[d.lineno for d in node.decorator_list]])
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            name, start = node.targets[0].id, node.lineno
            if name in flags or name.startswith("__"):
                continue
        else:
            continue
        while start > 1 and lines[start - 2].lstrip().startswith("#"):
            start -= 1  # comments directly above belong to the definition
        defs.append(Definition(name, family, tuple(lines[start - 1: node.end_lineno]), start,
                               node))
    return _Module(family, text, flags, tuple(defs))


@cache
def index() -> dict[str, Definition]:
    """Every definition of every op family, by name (names are unique)."""
    out: dict[str, Definition] = {}
    families = sorted(n for n in os.listdir(OPS_DIR)
                      if os.path.isfile(os.path.join(OPS_DIR, n, "modules.py")))
    for family in families:
        for d in _module(family).definitions:
            assert d.name not in out, f"{d.name} is defined in {out[d.name].family} and {family}"
            out[d.name] = d
    return out


# ---- partial evaluation of flag conditions ----------------------------------------------

def _peval(node: ast.expr, flags: frozenset[str], on: frozenset[str]):
    """True, False, or the residual expression once the flags are known."""
    if isinstance(node, ast.Name) and node.id in flags:
        return node.id in on
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        inner = _peval(node.operand, flags, on)
        return (not inner) if isinstance(inner, bool) else ast.UnaryOp(ast.Not(), inner)
    if isinstance(node, ast.BoolOp):
        is_and = isinstance(node.op, ast.And)
        rest = []
        for value in node.values:
            v = _peval(value, flags, on)
            if isinstance(v, bool):
                if v != is_and:  # False in an `and`, True in an `or`
                    return v
            else:
                rest.append(v)
        if not rest:
            return is_and
        return rest[0] if len(rest) == 1 else ast.BoolOp(node.op, rest)
    return node


def _mentions_flag(node: ast.expr, flags: frozenset[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in flags for n in ast.walk(node))


def specialise(d: Definition, features: frozenset[str]) -> str:
    """The source of a definition with its flags resolved for `features`."""
    module = _module(d.family)
    flags = module.flags
    on = frozenset(flag_name(f) for f in features) & flags
    lines = list(d.lines)
    n = len(lines)
    keep, dedent = [True] * n, [0] * n

    def at(lineno: int) -> int:
        return lineno - d.first

    def drop(a: int, b: int) -> None:  # file lines a..b inclusive
        for i in range(at(a), at(b) + 1):
            keep[i] = False

    def shift(a: int, b: int) -> None:
        for i in range(at(a), at(b) + 1):
            dedent[i] += 4

    # statement → the statements after it in its block: code a resolved branch that
    # returns makes unreachable is dropped with it
    after: dict[int, list[ast.stmt]] = {}
    for parent in ast.walk(d.node):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list):
                for i, stmt in enumerate(block):
                    after[id(stmt)] = block[i + 1:]

    def ends_flow(branch: list[ast.stmt]) -> bool:
        return isinstance(branch[-1], ast.Return | ast.Raise)

    def drop_after(node: ast.If) -> None:
        rest = after.get(id(node), [])
        if rest:
            drop(node.end_lineno + 1, rest[-1].end_lineno)

    for node in ast.walk(d.node):
        if not isinstance(node, ast.If) or not _mentions_flag(node.test, flags):
            continue
        assert node.test.end_lineno == node.lineno, f"{d.name}: one-line flag tests only"
        body_end = node.body[-1].end_lineno
        else_line = None
        if node.orelse:
            assert not (len(node.orelse) == 1 and isinstance(node.orelse[0], ast.If)
                        and lines[at(node.orelse[0].lineno)].lstrip().startswith("elif")), \
                f"{d.name}: no elif after a flag test"
            else_line = next(ln for ln in range(body_end + 1, node.orelse[0].lineno)
                             if lines[at(ln)].strip() == "else:")
        value = _peval(node.test, flags, on)
        if value is True:
            drop(node.lineno, node.lineno)
            shift(node.lineno + 1, else_line - 1 if else_line else body_end)
            if else_line:
                drop(else_line, node.orelse[-1].end_lineno)
            if ends_flow(node.body):
                drop_after(node)
        elif value is False:
            drop(node.lineno, else_line if else_line else body_end)
            if else_line:
                shift(else_line + 1, node.orelse[-1].end_lineno)
                if ends_flow(node.orelse):
                    drop_after(node)
        else:
            i = at(node.lineno)
            pad = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            rest = lines[i][node.test.end_col_offset:]  # ":" and any comment after it
            lines[i] = f"{pad}if {ast.unparse(value)}{rest}"
    pragma_lines = set()
    out = []
    for i, line in enumerate(lines):
        if not keep[i]:
            continue
        m = PRAGMA_RE.search(line)
        if m:
            cond = _peval(ast.parse(m.group(1), mode="eval").body, flags, on)
            assert isinstance(cond, bool), f"{d.name}: `# if` takes flags only: {line}"
            pragma_lines.add(i + d.first)
            if not cond:
                continue
            line = line[: m.start()]
        if dedent[i]:
            assert line[: dedent[i]].strip() == "", (d.name, line)
            line = line[dedent[i]:]
        out.append(line)
    text = "\n".join(out)
    return _rejoin_signatures(text, pragma_lines)


def _rejoin_signatures(text: str, pragmas: set[int]) -> str:
    """In a definition with `# if` lines, signatures laid out as ruff would anew (they
    may have lost parameters): on one line, or the parameters hugged on one line, if
    they fit."""
    if not pragmas:
        return text
    lines = text.split("\n")
    for node in sorted((n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)),
                       key=lambda n: -n.lineno):
        start = node.lineno - 1
        if not lines[start].rstrip().endswith("("):
            continue
        end = next((i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":")
                    and lines[i].lstrip().startswith(")")), None)
        if end is None:
            continue
        params = [p.strip().rstrip(",") for p in lines[start + 1:end]]
        if any(not p or p.startswith("#") or "  #" in p for p in params):
            continue
        head, tail = lines[start].rstrip(), lines[end].strip()  # "def f(", ") -> T:"
        pad = head[: len(head) - len(head.lstrip())]
        one = f"{head}{', '.join(params)}{tail}"
        hugged = f"{pad}    {', '.join(params)}"
        if len(one) <= 100:
            lines[start:end + 1] = [one]
        elif len(hugged) <= 100:
            lines[start:end + 1] = [head, hugged, f"{pad}{tail}"]
    return "\n".join(lines)


def init_defaults(name: str) -> dict[str, object]:
    """The literal defaults of a class's constructor parameters (an op's constructor
    call leaves out the arguments that equal them)."""
    node = index()[name].node
    init = next((n for n in getattr(node, "body", []) if isinstance(n, ast.FunctionDef)
                 and n.name == "__init__"), None)
    if init is None:
        return {}
    out: dict[str, object] = {}
    params = [*init.args.args, *init.args.kwonlyargs]
    defaults = [None] * (len(init.args.args) - len(init.args.defaults)) + \
        [*init.args.defaults, *init.args.kw_defaults]
    for param, default in zip(params, defaults, strict=True):
        if default is not None:
            try:
                out[param.arg] = ast.literal_eval(default)
            except ValueError:
                continue
    return out


def _union_members(tree: ast.AST) -> list[ast.Name]:
    """The names that are members of a `|` union in an annotation (`mask: torch.Tensor |
    DocumentMask | None`): types a parameter may also take."""
    annotations = [a for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                   for a in (*[x.annotation for x in (*n.args.args, *n.args.kwonlyargs)],
                             n.returns) if a is not None]
    annotations += [n.annotation for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)]
    members = []
    for annotation in annotations:
        for node in ast.walk(annotation):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
                members += [x for x in (node.left, node.right) if isinstance(x, ast.Name)]
    return members


def _references(source: str) -> list[str]:
    """Names a definition's source uses, in order of first use. A union member of an
    annotation is no use: a model whose code never makes that type leaves it out."""
    found: dict[str, tuple[int, int]] = {}
    tree = ast.parse(source)
    optional = {id(n) for n in _union_members(tree)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Name) or id(node) in optional:
            continue
        where = (node.lineno, node.col_offset)
        found[node.id] = min(found.get(node.id, where), where)
    return sorted(found, key=found.__getitem__)


def _drop_absent_members(source: str, present: set[str], defined: set[str]) -> str:
    """`source` without the annotation union members that name an op definition the
    model does not copy (`torch.Tensor | DocumentMask | None` → `torch.Tensor | None`)."""
    lines = source.split("\n")
    tree = ast.parse(source)
    absent = [n for n in _union_members(tree) if n.id in defined and n.id not in present]
    for node in sorted(absent, key=lambda n: (n.lineno, -n.col_offset)):
        line = lines[node.lineno - 1]
        start, end = node.col_offset, node.end_col_offset
        if line[end:].startswith(" | "):
            end += 3
        else:
            assert line[:start].endswith(" | "), line
            start -= 3
        lines[node.lineno - 1] = line[:start] + line[end:]
    return "\n".join(lines)


def copy_definitions(roots: list[str], features: frozenset[str]) -> list[str]:
    """The specialised sources of `roots` and of everything they use, each after
    the definitions it uses, otherwise in the order of `roots`."""
    defs = index()
    done: dict[str, str] = {}
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done or name in visiting:
            return
        visiting.add(name)
        source = specialise(defs[name], features)
        for ref in _references(source):
            if ref in defs and ref != name:
                visit(ref)
        visiting.discard(name)
        done[name] = source

    for root in roots:
        visit(root)
    present = set(done)
    return [_drop_absent_members(source, present, set(defs)) for source in done.values()]
