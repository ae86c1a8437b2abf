"""Imports, section table and inheritance: turns parsed files into definitions.

* `import "x.forge"` loads files relative to the importing one; cycles and
  paths that leave the root spec's folder are errors at the import.
* Every section (`model`, `vision`, `vlm`, `plan`) goes into one table.
* `model B extends A` is merged here: B's declarations replace A's by name, a
  block of the same name is merged component by component, and a block's
  dataflow (its tensor assignments and `return`) is replaced as a whole when
  the override states one.

Blocks' statements are split into declarations (components and local
parameters) and dataflow (assignments that read a tensor), which is a purely
syntactic distinction: dataflow reads the block's inputs or earlier dataflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import ast
from .diagnostics import Diagnostics, ForgeError, Span, did_you_mean
from .parse import parse
from .source import Source, read_source

SECTION_KINDS = ("model", "vision", "vlm", "plan")
# Imports and `extends` chains deeper than this are refused (E005) rather than
# recursed into, so that no input can exhaust Python's stack.
MAX_NESTING = 64


@dataclass
class BlockDef:
    name: str
    name_span: Span
    inputs: tuple[tuple[str, Span], ...]
    decls: dict[str, ast.Assign]  # components and local parameters, by name
    flow: list[ast.Assign]  # dataflow in order
    ret: ast.Return | None
    span: Span
    owner: str  # the section that declared (the last part of) this block
    kind: str = "block"  # or "module": a sub-module of the model, used as a component


@dataclass
class SectionDef:
    kind: str
    name: str
    name_span: Span
    span: Span
    file: str
    base: str | None
    target: tuple[str, Span] | None  # `for MODEL` (plans)
    decls: dict[str, ast.Assign | ast.RuleAssign] = field(default_factory=dict)
    blocks: dict[str, BlockDef] = field(default_factory=dict)
    modules: dict[str, BlockDef] = field(default_factory=dict)  # `module NAME(x) { ... }`
    calls: list[ast.CallStmt] = field(default_factory=list)
    # name → the section that declared it, for "inherited from" notes
    origin: dict[str, str] = field(default_factory=dict)


@dataclass
class Program:
    root: str  # display path of the root spec
    sources: list[Source]
    sections: dict[str, SectionDef]
    root_sections: list[str]  # names of the sections written in the root file, in order


def load_program(path: str, diags: Diagnostics) -> Program:
    """Load the root spec and everything it imports. Raises ForgeError for unreadable roots."""
    loader = _Loader(diags)
    root = read_source(path)
    loader.root_dir = os.path.dirname(root.abspath)
    errors_before = diags.error_count
    modules = loader.load(root, [])
    # A file that failed to load or parse leaves its sections undefined: merging
    # now would only report their absence (unknown bases) as new errors.
    loaded_cleanly = diags.error_count == errors_before
    raw: dict[str, tuple[ast.Section, str]] = {}
    root_sections: list[str] = []
    for module in modules:
        for sec in module.sections:
            if sec.kind not in SECTION_KINDS:
                diags.error("E013", f"unknown section kind '{sec.kind}'", sec.kind_span,
                            hint=did_you_mean(sec.kind, SECTION_KINDS)
                            or f"sections are: {', '.join(SECTION_KINDS)}")
                continue
            if sec.name in raw:
                first = raw[sec.name][0]
                diags.error("E020", f"'{sec.name}' is defined twice", sec.name_span,
                            notes=[("first defined here", first.name_span)])
                continue
            raw[sec.name] = (sec, module.file)
            if module.file == root.path:
                root_sections.append(sec.name)
    merged: dict[str, SectionDef] = {}
    for name in raw if loaded_cleanly else ():
        _merge_section(name, raw, merged, diags, [])
    return Program(root.path, loader.sources, merged, root_sections)


class _Loader:
    def __init__(self, diags: Diagnostics):
        self.diags = diags
        self.root_dir = ""
        self.sources: list[Source] = []
        self.done: set[str] = set()

    def load(self, source: Source, stack: list[str]) -> list[ast.Module]:
        """Modules of `source` and its imports, imports first."""
        self.sources.append(source)
        self.done.add(source.abspath)
        try:
            module = parse(source.text, source.path)
        except ForgeError as e:
            self.diags.add(e.diagnostic)
            return []
        out: list[ast.Module] = []
        here = os.path.dirname(source.abspath)
        for imp in module.imports:
            target = os.path.normpath(os.path.join(here, imp.path))
            if os.path.isabs(imp.path) or os.path.commonpath([self.root_dir, target]) != self.root_dir:
                self.diags.error("E012", f"import '{imp.path}' leaves the root spec's folder",
                                 imp.span, hint="imports are relative paths inside the spec's folder")
                continue
            if len(stack) >= MAX_NESTING:  # loading recurses once per level
                self.diags.error("E005", f"imports nested deeper than {MAX_NESTING} levels",
                                 imp.span)
                continue
            if target in stack or target == source.abspath:
                self.diags.error("E011", f"import cycle: '{imp.path}' imports this file again",
                                 imp.span)
                continue
            if target in self.done:
                continue
            try:
                imported = read_source(target, at=imp.span)
            except ForgeError as e:
                d = e.diagnostic
                code = "E010" if d.code == "E001" else d.code
                self.diags.error(code, d.message if code != "E010" else
                                 f"cannot import '{imp.path}': {d.message}", d.span, d.hint)
                continue
            out.extend(self.load(imported, [*stack, source.abspath]))
        out.append(module)
        return out


def _referenced_names(node, out: set[str]) -> set[str]:
    """Every bare name (and the first part of dotted names) an AST node mentions."""
    if isinstance(node, ast.Ref):
        out.add(node.parts[0])
    elif isinstance(node, ast.Call):
        _referenced_names(node.func, out)
        for a in node.args:
            _referenced_names(a.value, out)
    elif isinstance(node, ast.BinOp):
        _referenced_names(node.left, out)
        _referenced_names(node.right, out)
    elif isinstance(node, ast.Neg):
        _referenced_names(node.operand, out)
    elif isinstance(node, ast.ListExpr):
        for i in node.items:
            _referenced_names(i, out)
    elif isinstance(node, ast.Assign):
        _referenced_names(node.value, out)
    elif isinstance(node, ast.RuleAssign):
        _referenced_names(node.call, out)
        for r in node.rules:
            out.add(r.target)
            for w in r.words:
                if isinstance(w.value, str):
                    out.add(w.value)
    elif isinstance(node, ast.Return):
        _referenced_names(node.value, out)
    elif isinstance(node, ast.CallStmt):
        _referenced_names(node.call, out)
    return out


def section_references(sec: SectionDef) -> set[str]:
    names: set[str] = set()
    for d in sec.decls.values():
        _referenced_names(d, names)
    for b in [*sec.blocks.values(), *sec.modules.values()]:
        for d in b.decls.values():
            _referenced_names(d, names)
        for f in b.flow:
            _referenced_names(f, names)
        if b.ret is not None:
            _referenced_names(b.ret, names)
    for c in sec.calls:
        _referenced_names(c, names)
    return names


def _merge_section(name: str, raw: dict, merged: dict[str, SectionDef], diags: Diagnostics,
                   stack: list[str]) -> SectionDef | None:
    if name in merged:
        return merged[name]
    sec, file = raw[name]
    base_def: SectionDef | None = None
    if sec.base is not None:
        base_name, base_span = sec.base
        if base_name in stack or base_name == name:
            diags.error("E042", f"'{name}' extends itself through '{base_name}'", base_span)
        elif len(stack) >= MAX_NESTING:  # merging recurses once per level
            diags.error("E005", f"inheritance chain deeper than {MAX_NESTING} levels", base_span)
        elif base_name not in raw:
            diags.error("E040", f"unknown base '{base_name}'", base_span,
                        hint=did_you_mean(base_name, [n for n in raw if n != name])
                        or "import the file that defines it")
        elif raw[base_name][0].kind != sec.kind:
            diags.error("E040", f"'{name}' is a {sec.kind} but its base '{base_name}' is a "
                        f"{raw[base_name][0].kind}", base_span)
        else:
            base_def = _merge_section(base_name, raw, merged, diags, [*stack, name])
    out = SectionDef(sec.kind, name, sec.name_span, sec.span, file,
                     base_def.name if base_def else None, sec.target)
    if base_def is not None:
        out.decls = dict(base_def.decls)
        out.blocks = dict(base_def.blocks)
        out.modules = dict(base_def.modules)
        out.calls = list(base_def.calls)
        out.origin = dict(base_def.origin)
    own_new: list[tuple[str, Span]] = []
    for stmt in sec.body:
        if isinstance(stmt, ast.BlockDecl):
            _merge_block(stmt, out, name, diags)
        elif isinstance(stmt, ast.Assign | ast.RuleAssign):
            if stmt.name in out.origin and out.origin[stmt.name] == name:
                diags.error("E020", f"'{stmt.name}' is defined twice", stmt.name_span,
                            notes=[("first defined here", out.decls[stmt.name].name_span)])
                continue
            if stmt.name in out.blocks:
                diags.error("E020", f"'{stmt.name}' is already a block", stmt.name_span,
                            notes=[("block defined here", out.blocks[stmt.name].name_span)])
                continue
            if stmt.name in out.modules:
                diags.error("E020", f"'{stmt.name}' is already a module", stmt.name_span,
                            notes=[("module defined here", out.modules[stmt.name].name_span)])
                continue
            if base_def is not None and stmt.name not in base_def.decls:
                own_new.append((stmt.name, stmt.name_span))
            out.decls[stmt.name] = stmt
            out.origin[stmt.name] = name
        elif isinstance(stmt, ast.CallStmt):
            out.calls.append(stmt)
        elif isinstance(stmt, ast.Return):
            diags.error("E050", "'return' outside a block", stmt.span)
    if base_def is not None and own_new:
        # An addition that nothing reads is almost always a misspelt override.
        used = section_references(out)
        for new_name, span in own_new:
            if new_name not in used:
                diags.error("E041", f"'{name}' overrides '{new_name}', which its base "
                            f"'{base_def.name}' does not have", span,
                            hint=did_you_mean(new_name, base_def.decls)
                            or "a name added in a derived model must be used by it")
    merged[name] = out
    return out


def _merge_block(decl: ast.BlockDecl, sec: SectionDef, owner: str, diags: Diagnostics) -> None:
    what = decl.kind  # "block" or "module"
    table, other = (sec.modules, sec.blocks) if what == "module" else (sec.blocks, sec.modules)
    if decl.name in sec.decls:
        diags.error("E020", f"{what} '{decl.name}' clashes with a declaration of the same name",
                    decl.name_span, notes=[("declared here", sec.decls[decl.name].name_span)])
        return
    if decl.name in other:
        diags.error("E020", f"{what} '{decl.name}' clashes with a "
                    f"{'block' if what == 'module' else 'module'} of the same name",
                    decl.name_span, notes=[("defined here", other[decl.name].name_span)])
        return
    existing = table.get(decl.name)
    if existing is not None and existing.owner == owner:
        diags.error("E020", f"{what} '{decl.name}' is defined twice", decl.name_span,
                    notes=[("first defined here", existing.name_span)])
        return
    base: BlockDef | None = None
    overriding = existing is not None  # same name, inherited from the base model
    if decl.base is not None:
        if overriding:
            diags.error("E043", f"block '{decl.name}' overrides an inherited block and cannot "
                        "also extend another", decl.base[1])
            return
        base = table.get(decl.base[0])
        if base is None:
            diags.error("E040", f"unknown base {what} '{decl.base[0]}'", decl.base[1],
                        hint=did_you_mean(decl.base[0], table))
            return
    elif overriding:
        base = existing

    inputs = decl.inputs
    if base is not None and inputs != base.inputs:
        if tuple(n for n, _ in inputs) != tuple(n for n, _ in base.inputs):
            diags.error("E044", f"block '{decl.name}' takes ({', '.join(n for n, _ in inputs)}) "
                        f"but its base takes ({', '.join(n for n, _ in base.inputs)})",
                        decl.name_span)
            return
    seen_inputs: dict[str, Span] = {}
    for n, s in inputs:
        if n in seen_inputs:
            diags.error("E020", f"input '{n}' is listed twice", s)
        seen_inputs[n] = s

    decls: dict[str, ast.Assign] = dict(base.decls) if base else {}
    own_decls: dict[str, ast.Assign] = {}
    flow: list[ast.Assign] = []
    ret: ast.Return | None = None
    tensors = set(seen_inputs)
    # A statement is dataflow if it reads a tensor, even one computed further
    # down (binding reports that as E048, not as a parameter error).
    flowing = set(seen_inputs)
    readers: dict[str, list[str]] = {}  # name → the statements that read it (linear, not n²)
    for s in decl.body:
        if isinstance(s, ast.Assign):
            for n in _referenced_names(s.value, set()):
                readers.setdefault(n, []).append(s.name)
    todo = list(flowing)
    while todo:
        for reader in readers.get(todo.pop(), ()):
            if reader not in flowing:
                flowing.add(reader)
                todo.append(reader)
    for stmt in decl.body:
        if isinstance(stmt, ast.Assign):
            reads = _referenced_names(stmt.value, set())
            if reads & flowing:
                if stmt.name in tensors:
                    diags.error("E020", f"'{stmt.name}' is assigned twice; dataflow values are "
                                "single-assignment", stmt.name_span)
                    continue
                tensors.add(stmt.name)
                flow.append(stmt)
            else:
                if stmt.name in own_decls or stmt.name in seen_inputs:
                    first = own_decls.get(stmt.name)
                    diags.error("E020", f"'{stmt.name}' is defined twice", stmt.name_span,
                                notes=[("first defined here", first.name_span)] if first else [])
                    continue
                own_decls[stmt.name] = stmt
        elif isinstance(stmt, ast.Return):
            if ret is not None:
                diags.error("E050", "a block returns once", stmt.span)
            ret = stmt
        elif isinstance(stmt, ast.BlockDecl):
            if stmt.kind == "module":
                diags.error("E045", f"modules are declared in the model, not inside a {what}",
                            stmt.name_span)
            else:
                diags.error("E045", "blocks cannot be nested", stmt.name_span)
        elif isinstance(stmt, ast.RuleAssign):
            diags.error("E045", "a stack belongs to the model, not inside a block", stmt.span)
        elif isinstance(stmt, ast.CallStmt):
            diags.error("E053", "a call inside a block must be assigned to a name", stmt.span,
                        hint="write `name = ...`, or `return ...`")
    for stmt in flow:
        if stmt.name in own_decls:
            diags.error("E020", f"'{stmt.name}' is both a component and a dataflow value",
                        stmt.name_span, notes=[("declared here", own_decls[stmt.name].name_span)])
    if overriding and base is not None:
        used = set()
        for f in (flow or base.flow):
            _referenced_names(f, used)
        if ret or base.ret:
            _referenced_names(ret or base.ret, used)
        for d in {**decls, **own_decls}.values():
            _referenced_names(d, used)
        for n, stmt in own_decls.items():
            if n not in base.decls and n not in used:
                diags.error("E041", f"block '{decl.name}' overrides '{n}', which the inherited "
                            "block does not have", stmt.name_span,
                            hint=did_you_mean(n, base.decls)
                            or "a name added in an override must be used by it")
    decls.update(own_decls)
    if base is not None and not flow and ret is None:
        flow, ret = list(base.flow), base.ret
    elif ret is None:
        diags.error("E050", f"{what} '{decl.name}' has no 'return'", decl.name_span,
                    hint=f"end the {what} with `return <tensor>`")
    table[decl.name] = BlockDef(decl.name, decl.name_span, inputs, decls, flow, ret,
                                decl.span, owner, what)
