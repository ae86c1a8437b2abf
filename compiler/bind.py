"""Semantic binding: names, values, op arguments, block dataflow and layer stacks.

Input: the merged sections of compiler/resolve.py. Output: one `Model` per
model section, where
  * every parameter has a value (integer arithmetic is exact: `/` must divide),
  * every component is an op from the registry with type- and range-checked
    arguments (defaults and derived defaults filled in),
  * every block's dataflow is a small expression tree over its components,
  * the layer stack is a concrete list of blocks per layer.
Errors are collected, never raised, so one run reports all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import ast
from .compose import module_op, placeholder_op, split_sizes
from .diagnostics import Diagnostics, Span, did_you_mean, suggest
from .flow import FAct, FAdd, FApply, Flow, FMul, FRef, FScale, FSub
from .functions import ACTIVATIONS, FUNCTIONS
from .ops import OPS, ArgSpec, OpDef, ops_for
from .parse import MAX_INT
from .resolve import BlockDef, Program, SectionDef, _referenced_names, section_references

MAX_LAYERS = 4096
# Evaluation recurses through expressions and through the parameters they
# name (`a = b + 1`, `b = c * 2`, ...); past this depth it is an error (E005),
# so that no spec can exhaust Python's stack (~6 frames per level).
MAX_EVAL_DEPTH = 100
STACK_OP = "stack"
# The model's fixed spine (Llama-style pre-norm): name → accepted ops.
SPINE = {
    "token_embedding": ops_for("token_embedding"),
    "layers": (STACK_OP,),
    "norm": ops_for("norm"),
    "output_head": ops_for("output_head"),
}


# A vision encoder's spine (ViT): patches → non-causal blocks → final norm.
VISION_SPINE = {
    "patch_embedding": ops_for("patch_embedding"),
    "layers": (STACK_OP,),
    "norm": ops_for("norm"),
}
SPINES = {"model": SPINE, "vision": VISION_SPINE}


# Model-level parameters with a meaning of their own (read by code generation).
SETTINGS = {
    "init_std": ArgSpec("init_std", "float", 0.02, min=0.0, max=1.0,
                        doc="std of the normal init of every matrix"),
    "init_depth_scaled": ArgSpec("init_depth_scaled", "bool", True,
                                 doc="scale output projections' init by 1/sqrt(2·n_layers)"),
}


class _Invalid(Exception):
    """An expression could not be evaluated; the reason is already reported."""


@dataclass
class Component:
    name: str
    op: OpDef
    args: dict[str, Any]
    arg_spans: dict[str, Span]
    span: Span  # the op call
    name_span: Span
    ok: bool = True  # False when an argument failed to bind; later passes skip it
    # the spec's expression of each given argument (code generation reads them as
    # ModelConfig fields where they name the model's parameters)
    arg_exprs: dict[str, ast.Expr] = field(default_factory=dict)
    # a component that is one of the model's own modules: its bound body (the op
    # is then synthesised from it by compiler/compose.py)
    module: Block | None = None


@dataclass(frozen=True)
class ComponentValue:
    """A component used as a value, e.g. the `rope` argument of attention."""

    component: Component

    def __repr__(self) -> str:
        return self.component.name


# ---- dataflow: compiler/flow.py (re-exported here for the passes that read it) --------

@dataclass
class Block:
    name: str
    name_span: Span
    span: Span
    inputs: tuple[str, ...]
    components: dict[str, Component]
    flow: list[tuple[str, Flow, Span]]  # (value name, expression, statement span)
    ret: Flow | None
    ret_span: Span | None


@dataclass
class LayerSlot:
    index: int
    block: str
    span: Span  # the stack rule that chose this block


@dataclass
class Insertion:
    after: int  # the layer it follows
    block: str
    span: Span


@dataclass
class Model:
    name: str
    file: str
    span: Span
    name_span: Span
    params: dict[str, Any]
    param_spans: dict[str, Span]
    components: dict[str, Component]  # model-level
    blocks: dict[str, Block]
    layers: list[LayerSlot] = field(default_factory=list)
    inserted: list[Insertion] = field(default_factory=list)
    stack_span: Span | None = None
    kind: str = "model"  # or "vision": a ViT encoder (VISION_SPINE)
    modules: dict[str, Block] = field(default_factory=dict)  # bound `module`s, by name

    def all_components(self) -> Iterator[Component]:
        """Every successfully bound component: model-level first, then per block,
        then those inside the model's modules."""
        yield from (c for c in self.components.values() if c.ok)
        for block in self.blocks.values():
            yield from (c for c in block.components.values() if c.ok)
        for module in self.modules.values():
            yield from (c for c in module.components.values() if c.ok)


# ---- evaluation scopes ---------------------------------------------------------------


class _Scope:
    def __init__(self, binder: _Binder, decls: dict[str, ast.Assign | ast.RuleAssign],
                 parent: _Scope | None, label: str, tensors: frozenset[str] = frozenset()):
        self.binder = binder
        self.decls = decls
        self.parent = parent
        self.label = label
        self.tensors = tensors
        self.values: dict[str, Any] = {}
        self.failed: set[str] = set()
        self.active: list[str] = []

    def known_names(self) -> set[str]:
        names = set(self.decls) | set(self.tensors)
        return names | (self.parent.known_names() if self.parent else set())

    def lookup(self, name: str, span: Span) -> Any:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.decls:
                return scope.get(name)
            if name in scope.tensors:
                self.binder.diags.error("E053", f"'{name}' is a tensor; parameters and op "
                                        "arguments are compile-time values", span)
                raise _Invalid
            scope = scope.parent
        d = self.binder.diags
        if name in OPS or name in FUNCTIONS:
            d.error("E021", f"'{name}' is an op; call it with arguments", span)
        else:
            d.error("E021", f"unknown name '{name}'", span,
                    hint=did_you_mean(name, self.known_names()))
        raise _Invalid

    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name in self.failed:
            raise _Invalid
        decl = self.decls[name]
        if name in self.active:
            cycle = self.active[self.active.index(name):] + [name]
            self.binder.diags.error("E046", "cyclic definition: " + " → ".join(cycle),
                                    decl.name_span)
            self.failed.add(name)
            raise _Invalid
        self.active.append(name)
        try:
            if isinstance(decl, ast.RuleAssign):
                value = None  # a stack is structure, bound by _bind_stack
            else:
                value = self.binder.declaration(decl, self)
        except _Invalid:
            self.failed.add(name)
            raise
        finally:
            self.active.pop()
        self.values[name] = value
        return value


# ---- the binder ------------------------------------------------------------------------


class _Binder:
    def __init__(self, program: Program, diags: Diagnostics):
        self.program = program
        self.diags = diags
        self.section_scopes: dict[str, _Scope] = {}
        self.depth = 0  # nesting of evaluate(), across declarations (see MAX_EVAL_DEPTH)
        self.depth_reported = False
        # the model being bound: its module declarations, those bound so far (None:
        # failed) and the chain of modules being bound (recursion, E065)
        self.model_scope: _Scope | None = None
        self.module_defs: dict[str, BlockDef] = {}
        self.bound_modules: dict[str, Block | None] = {}
        self.module_chain: list[str] = []

    # -- values

    def section_scope(self, name: str) -> _Scope:
        if name not in self.section_scopes:
            sec = self.program.sections[name]
            self.section_scopes[name] = _Scope(self, sec.decls, None, name)
        return self.section_scopes[name]

    def declaration(self, decl: ast.Assign, scope: _Scope) -> Any:
        value = decl.value
        if isinstance(value, ast.Call) and len(value.func.parts) == 1 and value.func.parts[0] in OPS:
            return ComponentValue(self.component(decl.name, decl.name_span, value, scope))
        if isinstance(value, ast.Call) and value.func.dotted in self.module_defs \
                and value.func.dotted not in FUNCTIONS:
            return ComponentValue(self.module_component(decl.name, decl.name_span, value))
        return self.evaluate(value, scope)

    def evaluate(self, e: ast.Expr, scope: _Scope) -> Any:
        if self.depth >= MAX_EVAL_DEPTH:
            if not self.depth_reported:  # one chain, one error
                self.depth_reported = True
                self.diags.error("E005", f"definitions nested deeper than {MAX_EVAL_DEPTH} "
                                 "levels", e.span, hint="parameters defined through long chains "
                                 "of other parameters; shorten the chain")
            raise _Invalid
        self.depth += 1
        try:
            return self._evaluate(e, scope)
        finally:
            self.depth -= 1

    def _evaluate(self, e: ast.Expr, scope: _Scope) -> Any:
        d = self.diags
        if isinstance(e, ast.Int | ast.Float | ast.Str | ast.Bool):
            return e.value
        if isinstance(e, ast.ListExpr):
            return [self.evaluate(i, scope) for i in e.items]
        if isinstance(e, ast.Ref):
            if len(e.parts) == 1:
                return scope.lookup(e.parts[0], e.span)
            return self.dotted(e, scope)
        if isinstance(e, ast.Neg):
            v = self.evaluate(e.operand, scope)
            if not _is_number(v):
                d.error("E033", f"cannot negate {_describe(v)}", e.span)
                raise _Invalid
            return -v
        if isinstance(e, ast.BinOp):
            return self.binop(e, scope)
        if isinstance(e, ast.Call):
            return self.call(e, scope)
        raise AssertionError(e)

    def dotted(self, e: ast.Ref, scope: _Scope) -> Any:
        head, *rest = e.parts
        if head not in self.program.sections:
            self.diags.error("E021", f"unknown section '{head}'", e.span,
                             hint=did_you_mean(head, self.program.sections))
            raise _Invalid
        if len(rest) != 1:
            self.diags.error("E021", f"'{e.dotted}': only `section.name` is supported", e.span)
            raise _Invalid
        target = self.section_scope(head)
        if rest[0] not in target.decls:
            self.diags.error("E021", f"'{head}' has no '{rest[0]}'", e.span,
                             hint=did_you_mean(rest[0], target.decls))
            raise _Invalid
        return target.get(rest[0])

    def binop(self, e: ast.BinOp, scope: _Scope) -> Any:
        left = self.evaluate(e.left, scope)
        right = self.evaluate(e.right, scope)
        d = self.diags
        if not (_is_number(left) and _is_number(right)):
            if e.op == "+" and isinstance(left, str) and isinstance(right, str):
                return left + right
            d.error("E033", f"cannot apply '{e.op}' to {_describe(left)} and {_describe(right)}",
                    e.op_span)
            raise _Invalid
        both_int = isinstance(left, int) and isinstance(right, int)
        if e.op in ("/", "//", "%") and right == 0:
            d.error("E031", "division by zero", e.right.span)
            raise _Invalid
        if e.op == "+":
            result = left + right
        elif e.op == "-":
            result = left - right
        elif e.op == "*":
            result = left * right
        elif e.op == "/":
            if both_int:
                if left % right:
                    d.error("E030", f"{left} / {right} does not divide exactly", e.span,
                            hint=f"use '//' to round down ({left // right}), or change the sizes")
                    raise _Invalid
                result = left // right
            else:
                result = left / right
        elif e.op == "//":
            result = left // right
        else:
            result = left % right
        if isinstance(result, int) and abs(result) > MAX_INT:
            d.error("E032", "integer overflow: result exceeds 64 bits", e.span)
            raise _Invalid
        if isinstance(result, float) and (result != result or abs(result) == float("inf")):
            d.error("E032", "number out of range", e.span)
            raise _Invalid
        return result

    def call(self, e: ast.Call, scope: _Scope) -> Any:
        name = e.func.dotted
        fn = FUNCTIONS.get(name)
        if fn is not None:
            args, spans, ok = self.bind_args(fn.name, fn.args, e, scope)
            if not ok:
                raise _Invalid
            for a in fn.args:
                if a.type == "size" and args[a.name] <= 0:
                    self.diags.error("E073", f"'{a.name}' of {fn.name}() must be positive, got "
                                     f"{args[a.name]}", spans.get(a.name, e.span))
                    raise _Invalid
            return fn.impl(args)
        if name in OPS:
            self.diags.error("E047", f"op '{name}' used inside an expression", e.func.span,
                             hint=f"declare it as a component: `name = {name}(...)`")
        elif name == STACK_OP:
            self.diags.error("E047", "stack() takes a rule body: `layers = stack(n) { default: "
                             "block }`", e.func.span)
        elif name in ACTIVATIONS:
            self.diags.error("E053", f"'{name}' is a function of tensors, not of compile-time "
                             "values", e.func.span,
                             hint="apply it in a block's or module's dataflow")
        else:
            self.diags.error("E022", f"unknown op or function '{name}'", e.func.span,
                             hint=did_you_mean(name, [*OPS, *self.module_defs, *FUNCTIONS]))
        raise _Invalid

    # -- arguments (shared by ops and functions)

    def bind_args(self, what: str, specs: tuple[ArgSpec, ...], call: ast.Call,
                  scope: _Scope, exprs: dict[str, ast.Expr] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, Span], bool]:
        d = self.diags
        args: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        ok = True
        positional = [s for s in specs if not s.derived] + [s for s in specs if s.derived]
        seen_keyword = misplaced = False
        misspelt: set[str] = set()  # required names a misspelt keyword probably meant
        for i, arg in enumerate(call.args):
            if arg.name is None:
                if seen_keyword:
                    d.error("E027", "positional argument after a named one", arg.span)
                    misplaced = True  # it was meant for some parameter: none is "missing"
                    ok = False
                    continue
                if i >= len(positional):
                    d.error("E028", f"{what}() takes at most {len(positional)} positional "
                            f"argument{'s' if len(positional) != 1 else ''}", arg.span)
                    ok = False
                    continue
                spec = positional[i]
            else:
                seen_keyword = True
                spec = next((s for s in specs if s.name == arg.name), None)
                if spec is None:
                    best = suggest(arg.name, [s.name for s in specs])
                    d.error("E023", f"{what}() has no argument '{arg.name}'",
                            arg.name_span or arg.span,
                            hint=f"did you mean '{best}'?" if best
                            else "arguments: " + ", ".join(s.name for s in specs))
                    if best:
                        misspelt.add(best)
                    ok = False
                    continue
            if spec.name in spans:
                d.error("E027", f"argument '{spec.name}' given twice", arg.span,
                        notes=[("first given here", spans[spec.name])])
                ok = False
                continue
            spans[spec.name] = arg.span
            if exprs is not None:
                exprs[spec.name] = arg.value
            try:
                args[spec.name] = self.typed(what, spec, arg.value, scope)
            except _Invalid:
                ok = False
        for spec in specs:
            if spec.name in args or spec.name in spans:
                continue
            if spec.required and spec.name not in misspelt and not misplaced:
                d.error("E024", f"{what}() is missing the argument '{spec.name}'", call.span,
                        hint=f"{spec.name}: {spec.doc}" if spec.doc else None)
                ok = False
            elif spec.required:
                ok = False  # reported as the misspelt keyword (E023) or misplaced one (E027)
            else:
                args[spec.name] = None if spec.derived else spec.default
        return args, spans, ok

    def typed(self, what: str, spec: ArgSpec, expr: ast.Expr, scope: _Scope) -> Any:
        d = self.diags
        if spec.type.startswith("op:"):
            role = spec.type[3:]
            name = expr.func.dotted if isinstance(expr, ast.Call) else None
            if name not in OPS or OPS[name].role != role:
                choices = sorted(n for n, o in OPS.items() if o.role == role)
                d.error("E025", f"argument '{spec.name}' of {what}() expects a {role}: "
                        f"{' or '.join(f'{c}(...)' for c in choices)}", expr.span,
                        hint=did_you_mean(name, choices) if name else None)
                raise _Invalid
            comp = self.component(spec.name, expr.span, expr, scope)
            if not comp.ok:
                raise _Invalid
            return ComponentValue(comp)
        if spec.type.startswith("ref:"):
            wanted = spec.type[4:].split("|")
            want = " or ".join(wanted)
            a_want = ("an " if want[0] in "aeiou" else "a ") + want  # "an embedding"
            if not (isinstance(expr, ast.Ref) and len(expr.parts) == 1):
                d.error("E025", f"argument '{spec.name}' of {what}() expects {a_want} component",
                        expr.span)
                raise _Invalid
            value = scope.lookup(expr.parts[0], expr.span)
            if not (isinstance(value, ComponentValue) and value.component.op.name in wanted):
                d.error("E025", f"argument '{spec.name}' of {what}() expects {a_want} component, "
                        f"got {_describe(value)}", expr.span)
                raise _Invalid
            return value
        if (spec.type == "choice" and isinstance(expr, ast.Ref) and len(expr.parts) == 1
                and expr.parts[0] not in scope.known_names()):
            if expr.parts[0] in spec.choices:
                return expr.parts[0]  # `scaling = llama3` reads as the symbol
            d.error("E026", f"argument '{spec.name}' of {what}() must be one of "
                    f"{', '.join(repr(c) for c in spec.choices)}, got '{expr.parts[0]}'",
                    expr.span, hint=did_you_mean(expr.parts[0], spec.choices))
            raise _Invalid
        value = self.evaluate(expr, scope)
        if spec.type in ("size", "int"):
            if not (isinstance(value, int) and not isinstance(value, bool)):
                d.error("E025", f"argument '{spec.name}' of {what}() expects an integer, got "
                        f"{_describe(value)}", expr.span)
                raise _Invalid
        elif spec.type in ("float", "number"):
            if not _is_number(value):
                d.error("E025", f"argument '{spec.name}' of {what}() expects a number, got "
                        f"{_describe(value)}", expr.span)
                raise _Invalid
            if spec.type == "float":
                value = float(value)
        elif spec.type == "bool":
            if not isinstance(value, bool):
                d.error("E025", f"argument '{spec.name}' of {what}() expects true or false, got "
                        f"{_describe(value)}", expr.span)
                raise _Invalid
        elif spec.type == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                d.error("E025", f"argument '{spec.name}' of {what}() expects a list of strings, "
                        f"got {_describe(value)}", expr.span)
                raise _Invalid
        elif spec.type == "floats":
            if not isinstance(value, list) or not all(_is_number(v) for v in value):
                d.error("E025", f"argument '{spec.name}' of {what}() expects a list of numbers, "
                        f"got {_describe(value)}", expr.span)
                raise _Invalid
            value = tuple(float(v) for v in value)
        elif spec.type == "choice":
            if (value is None or isinstance(value, ComponentValue)) and \
                    isinstance(expr, ast.Ref) and expr.parts[0] in spec.choices:
                # a stack or component named like the word is no parameter: every
                # model has `layers`, and `fsdp(units = layers)` means the word
                value = expr.parts[0]
            if not isinstance(value, str) or value not in spec.choices:
                d.error("E026", f"argument '{spec.name}' of {what}() must be one of "
                        f"{', '.join(repr(c) for c in spec.choices)}, got {_describe(value)}",
                        expr.span, hint=did_you_mean(str(value), spec.choices))
                raise _Invalid
        if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
            bounds = (f"≥ {spec.min}" if spec.max is None else
                      f"≤ {spec.max}" if spec.min is None else f"in [{spec.min}, {spec.max}]")
            d.error("E026", f"argument '{spec.name}' of {what}() must be {bounds}, got {value}",
                    expr.span)
            raise _Invalid
        return value

    # -- components

    def component(self, name: str, name_span: Span, call: ast.Call, scope: _Scope) -> Component:
        op = OPS[call.func.parts[0]]
        exprs: dict[str, ast.Expr] = {}
        args, spans, ok = self.bind_args(op.name, op.args, call, scope, exprs)
        if ok:
            op.derive(args)
        return Component(name, op, args, spans, call.span, name_span, ok, exprs)

    # -- the model's own modules

    def module_component(self, name: str, name_span: Span, call: ast.Call) -> Component:
        """`mlp = geglu()`: a component that is one of the model's modules."""
        module = call.func.dotted
        if call.args:
            self.diags.error("E066", f"module '{module}' takes no arguments", call.args[0].span,
                             hint=f"its sizes are the model's parameters: write "
                             f"`{name} = {module}()`")
            return Component(name, placeholder_op(module), {}, {}, call.span, name_span, False)
        body = self.bind_module(module, call.func.span)
        if body is None:
            return Component(name, placeholder_op(module), {}, {}, call.span, name_span, False)
        op = module_op(body)
        # its arguments: the sizes tensor parallelism splits (op.split_by), for plans
        sizes = split_sizes(body, op.tp)
        return Component(name, op, sizes, {}, call.span, name_span, True, {}, body)

    def bind_module(self, module: str, used_at: Span) -> Block | None:
        """The bound body of a module (once per model); None if it failed."""
        if module in self.module_chain:
            cycle = self.module_chain[self.module_chain.index(module):] + [module]
            self.diags.error("E065", "module uses itself: " + " → ".join(cycle), used_at,
                             hint="a module may use other modules, but not itself")
            return None
        if module in self.bound_modules:
            return self.bound_modules[module]
        bdef = self.module_defs[module]
        self.module_chain.append(module)
        try:
            body = self.block(bdef, self.model_scope)
        finally:
            self.module_chain.pop()
        ok = self.check_module(bdef, body)
        self.bound_modules[module] = body if ok else None
        return self.bound_modules[module]

    def check_module(self, bdef: BlockDef, body: Block) -> bool:
        """What a module must satisfy beyond a block: every input is read (E067), and
        its ops are plain tensor maps (E068): attention reads the block's rotary
        tables, masks and KV cache, which a module's forward does not receive."""
        ok = all(c.ok for c in body.components.values()) and body.ret is not None \
            and len(body.flow) == len(bdef.flow)
        read: set[str] = set()
        for stmt in bdef.flow:
            _referenced_names(stmt.value, read)
        if bdef.ret is not None:
            _referenced_names(bdef.ret.value, read)
        for name, span in bdef.inputs:
            if name not in read:
                self.diags.error("E067", f"input '{name}' of module '{bdef.name}' is never "
                                 "used", span, hint="remove it, or use it in the module")
                ok = False
        for comp in body.components.values():
            op = comp.op
            if comp.module is None and op.role == "module" and (
                    op.mask is not None or op.caches or op.call != "{m}({x})"):
                self.diags.error("E068", f"{op.name} cannot be used inside a module", comp.span,
                                 hint="it needs the block's rotary tables, masks or KV cache: "
                                 "declare it in the block")
                ok = False
        return ok

    # -- models

    def model(self, sec: SectionDef) -> Model:
        scope = self.section_scope(sec.name)
        self.model_scope = scope
        self.module_defs = sec.modules
        self.bound_modules = {}
        self.module_chain = []
        params: dict[str, Any] = {}
        param_spans: dict[str, Span] = {}
        components: dict[str, Component] = {}
        for name, decl in sec.decls.items():
            try:
                value = scope.get(name)
            except _Invalid:
                continue
            if isinstance(value, ComponentValue):
                components[name] = value.component
            elif not isinstance(decl, ast.RuleAssign):
                params[name] = value
                param_spans[name] = decl.name_span
        for name, spec in SETTINGS.items():
            decl = sec.decls.get(name)
            if name in params and isinstance(decl, ast.Assign):
                try:
                    params[name] = self.typed("model", spec, decl.value, scope)
                except _Invalid:
                    del params[name]
        model = Model(sec.name, sec.file, sec.span, sec.name_span, params, param_spans,
                      components, {}, kind=sec.kind)
        for name, bdef in sec.blocks.items():
            model.blocks[name] = self.block(bdef, scope)
        for name in sec.modules:  # those no block uses are checked too
            if name in OPS or name in FUNCTIONS or name in ACTIVATIONS or name == STACK_OP:
                what = "op" if name in OPS else "function"
                self.diags.error("E069", f"module '{name}' is named like the {what} '{name}'",
                                 sec.modules[name].name_span,
                                 hint="give the module a name of its own")
                continue
            self.bind_module(name, sec.modules[name].name_span)
        model.modules = {n: b for n, b in self.bound_modules.items() if b is not None}
        self.spine(sec, model)
        for stmt in sec.calls:  # would otherwise be ignored without a word
            self.diags.error("E053", "a call in a model must be assigned to a name", stmt.span,
                             hint="write `name = ...`")
        stack = sec.decls.get("layers")
        if isinstance(stack, ast.RuleAssign):
            self.stack(stack, model, scope)
        self.unused(sec, model)
        return model

    def spine(self, sec: SectionDef, model: Model) -> None:
        for name, ops in SPINES[sec.kind].items():
            decl = sec.decls.get(name)
            if decl is None:
                self.diags.error("E080", f"{sec.kind} '{sec.name}' has no '{name}'", sec.name_span,
                                 hint=f"declare `{name} = {ops[0]}(...)`"
                                 + (" { default: BLOCK }" if ops[0] == STACK_OP else ""))
                continue
            got = decl.call.func.dotted if isinstance(decl, ast.RuleAssign) else (
                decl.value.func.dotted if isinstance(decl.value, ast.Call) else None)
            if got not in ops:
                self.diags.error("E081", f"'{name}' must be {' or '.join(ops)}(...)"
                                 + (f", not {got}(...)" if got else ""), decl.name_span)
        for name, decl in sec.decls.items():
            if isinstance(decl, ast.RuleAssign) and name != "layers":
                self.diags.error("E081", f"a stack must be named 'layers', not '{name}'",
                                 decl.name_span)

    def block(self, bdef: BlockDef, model_scope: _Scope) -> Block:
        inputs = tuple(n for n, _ in bdef.inputs)
        tensors = frozenset(inputs) | frozenset(a.name for a in bdef.flow)
        scope = _Scope(self, dict(bdef.decls), model_scope, bdef.name, tensors)
        components: dict[str, Component] = {}
        for name in bdef.decls:
            try:
                value = scope.get(name)
            except _Invalid:
                continue
            if isinstance(value, ComponentValue):
                components[name] = value.component
        defined: set[str] = set(inputs)
        flow: list[tuple[str, Flow, Span]] = []
        for stmt in bdef.flow:
            try:
                expr = self.flow(stmt.value, scope, defined, components, model_scope)
            except _Invalid:
                defined.add(stmt.name)
                scope.failed.add(stmt.name)  # reported; applying it later is no new error
                continue
            flow.append((stmt.name, expr, stmt.span))
            defined.add(stmt.name)
        ret = None
        if bdef.ret is not None:
            try:
                ret = self.flow(bdef.ret.value, scope, defined, components, model_scope)
            except _Invalid:
                pass
        return Block(bdef.name, bdef.name_span, bdef.span, inputs, components, flow, ret,
                     bdef.ret.span if bdef.ret else None)

    def flow(self, e: ast.Expr, scope: _Scope, defined: set[str],
             components: dict[str, Component], model_scope: _Scope) -> Flow:
        d = self.diags
        if isinstance(e, ast.Ref) and len(e.parts) == 1:
            name = e.parts[0]
            if name in defined:
                return FRef(name, e.span)
            if name in scope.tensors:
                d.error("E048", f"'{name}' is used before it is computed", e.span)
                raise _Invalid
            d.error("E053", f"expected a tensor, got '{name}'", e.span,
                    hint=did_you_mean(name, defined))
            raise _Invalid
        if isinstance(e, ast.Call):
            name = e.func.dotted
            if name in ACTIVATIONS and name not in components:
                return self.activation(e, scope, defined, components, model_scope)
            if name in components:
                args = []
                for a in e.args:
                    if a.name is not None:
                        d.error("E053", "components are applied to tensors, not named "
                                "arguments", a.span)
                        raise _Invalid
                    args.append(self.flow(a.value, scope, defined, components, model_scope))
                module = components[name].module
                if module is not None and len(args) != len(module.inputs):
                    n = len(module.inputs)
                    d.error("E057", f"'{name}' (module {module.name}) takes {n} input"
                            f"{'s' if n != 1 else ''}, got {len(args)}", e.span)
                    raise _Invalid
                return FApply(name, tuple(args), e.span)
            if name in scope.failed:
                raise _Invalid  # its definition failed and was reported
            if name in scope.decls:
                d.error("E053", f"'{name}' is a parameter, not a component", e.func.span)
            elif name in model_scope.decls:
                d.error("E049", f"model-level '{name}' cannot be applied inside a block",
                        e.func.span, hint="declare the component inside the block")
            elif name in OPS:
                # `mlp = swiglu(dim, hidden = x)`: a tensor passed as an op argument
                # (reported by lookup as E053) made this declaration look like dataflow.
                for a in e.args:
                    if a.name is not None:
                        self.evaluate(a.value, scope)
                d.error("E047", f"op '{name}' must be declared as a component before it is applied",
                        e.func.span, hint=f"declare `n = {name}(...)` in the block, then use `n(...)`")
            else:
                d.error("E021", f"unknown component '{name}'", e.func.span,
                        hint=did_you_mean(name, components))
            raise _Invalid
        if isinstance(e, ast.BinOp):
            if e.op == "+":
                return FAdd(self.flow(e.left, scope, defined, components, model_scope),
                            self.flow(e.right, scope, defined, components, model_scope), e.span)
            values = defined | scope.tensors | set(components)
            if e.op in ("*", "-") and _reads_tensor(e.left, values) \
                    and _reads_tensor(e.right, values):  # element-wise, of one shape (E055)
                left = self.flow(e.left, scope, defined, components, model_scope)
                right = self.flow(e.right, scope, defined, components, model_scope)
                return (FMul if e.op == "*" else FSub)(left, right, e.span)
            if e.op == "-":
                d.error("E053", "'-' subtracts a tensor from a tensor", e.op_span,
                        hint="dataflow supports '+', '-' and '*' of tensors of one shape, "
                        "and scaling by a number")
                raise _Invalid
            if e.op == "*":
                left_t = _reads_tensor(e.left, values)
                scalar, tensor = (e.right, e.left) if left_t else (e.left, e.right)
                if isinstance(scalar, ast.Call) and _reads_tensor(scalar, values):
                    d.error("E053", "a tensor can only be scaled by a number, not multiplied "
                            "by a tensor", scalar.span,
                            hint="dataflow supports '+' (residuals) and scaling by a number")
                    raise _Invalid
                factor = self.evaluate(scalar, scope)
                if not _is_number(factor):
                    d.error("E053", f"a tensor can only be scaled by a number, got "
                            f"{_describe(factor)}", scalar.span)
                    raise _Invalid
                return FScale(float(factor), self.flow(tensor, scope, defined, components,
                                                       model_scope), e.span)
            d.error("E053", f"'{e.op}' is not defined on tensors", e.op_span,
                    hint="dataflow supports '+', '-' and '*' of tensors of one shape, "
                    "and scaling by a number")
            raise _Invalid
        d.error("E053", "expected a tensor expression", e.span)
        raise _Invalid

    def activation(self, e: ast.Call, scope: _Scope, defined: set[str],
                   components: dict[str, Component], model_scope: _Scope) -> Flow:
        """`silu(gate(x))`, `softcap(logits, 30.0)`: an element-wise function of a tensor
        (compiler/functions.py), its other arguments compile-time values."""
        d = self.diags
        name = e.func.dotted
        act = ACTIVATIONS[name]
        takes = 1 + len(act.args)
        if not e.args or e.args[0].name is not None:
            d.error("E056", f"{name}() takes a tensor as its first argument", e.span,
                    hint=f"e.g. `{name}(gate(x){''.join(', ' + a.name for a in act.args)})`")
            raise _Invalid
        if len([a for a in e.args if a.name is None]) > takes:
            d.error("E056", f"{name}() takes {takes} argument{'s' if takes != 1 else ''}: a "
                    f"tensor{''.join(', ' + a.name for a in act.args)}", e.span)
            raise _Invalid
        operand = self.flow(e.args[0].value, scope, defined, components, model_scope)
        rest = ast.Call(e.func, e.args[1:], e.span)
        args, spans, ok = self.bind_args(name, act.args, rest, scope)
        if not ok:
            raise _Invalid
        for a in act.args:
            if args[a.name] <= 0:
                d.error("E056", f"'{a.name}' of {name}() must be positive, got {args[a.name]}",
                        spans.get(a.name, e.span))
                raise _Invalid
        return FAct(name, operand, tuple(float(args[a.name]) for a in act.args), e.span)

    def stack(self, decl: ast.RuleAssign, model: Model, scope: _Scope) -> None:
        d = self.diags
        model.stack_span = decl.span
        call = decl.call
        if call.func.dotted != STACK_OP:
            return  # reported by spine()
        spec = (ArgSpec("count", "int", doc="number of layers"),)
        args, spans, ok = self.bind_args(STACK_OP, spec, call, scope)
        if not ok:
            return
        count = args["count"]
        if count <= 0:
            d.error("E073", f"a stack needs at least one layer, got {count}", spans["count"])
            return
        if count > MAX_LAYERS:
            d.error("E026", f"a stack has at most {MAX_LAYERS} layers, got {count:,}",
                    spans["count"])
            return
        chosen: list[tuple[str, Span] | None] = [None] * count
        inserted: list[Insertion] = []
        rule_failed = False  # then unfilled layers are a consequence, not a new error
        for rule in decl.rules:
            if rule.target not in model.blocks:
                d.error("E060", f"unknown block '{rule.target}'", rule.target_span,
                        hint=did_you_mean(rule.target, model.blocks))
                rule_failed = True
                continue
            block = model.blocks[rule.target]
            if len(block.inputs) != 1:
                d.error("E062", f"block '{rule.target}' takes {len(block.inputs)} inputs; a "
                        "stack feeds one", rule.target_span)
                rule_failed = True
                continue
            selection = self.selector(rule, count, scope)
            if selection is None:
                rule_failed = True
                continue
            indices, insert = selection
            for i in indices:
                if insert:
                    inserted.append(Insertion(i, rule.target, rule.span))
                else:
                    chosen[i] = (rule.target, rule.span)
        missing = [i for i, c in enumerate(chosen) if c is None]
        if missing:
            shown = ", ".join(map(str, missing[:6])) + (", ..." if len(missing) > 6 else "")
            if not rule_failed:
                d.error("E061", f"layer{'s' if len(missing) > 1 else ''} {shown} of {count} "
                        f"{'have' if len(missing) > 1 else 'has'} no block", decl.name_span,
                        hint="add `default: BLOCK` to the stack")
            return
        model.layers = [LayerSlot(i, c[0], c[1]) for i, c in enumerate(chosen) if c]
        inserted.sort(key=lambda ins: ins.after)
        model.inserted = inserted

    def selector(self, rule: ast.Rule, count: int,
                 scope: _Scope) -> tuple[list[int], bool] | None:
        """Layer indices a rule selects, and whether it inserts rather than replaces."""
        d = self.diags
        words = list(rule.words)
        insert = False
        if isinstance(words[0].value, str) and words[0].value == "after":
            insert = True
            words = words[1:]
            if not words:
                d.error("E063", "'after' needs a selector, e.g. `after every 2: BLOCK`",
                        rule.words[0].span)
                return None
        keyword = words[0]
        kinds = ("default", "first", "last", "every", "at")
        if not isinstance(keyword.value, str) or keyword.value not in kinds:
            d.error("E063", f"unknown stack selector {keyword.value!r}", keyword.span,
                    hint=did_you_mean(str(keyword.value), (*kinds, "after"))
                    or "selectors: default, first N, last N, every K [from S], at I, after ...")
            return None
        values: list[int] = []
        names: list[str] = []
        for w in words[1:]:
            if isinstance(w.value, str) and w.value == "from":
                names.append("from")
                continue
            try:
                v = w.value if isinstance(w.value, int) else scope.lookup(w.value, w.span)
            except _Invalid:
                return None
            if not isinstance(v, int) or isinstance(v, bool):
                d.error("E063", f"a selector takes integers, got {_describe(v)}", w.span)
                return None
            values.append(v)
        shape = (keyword.value, tuple(names))
        bad = lambda: d.error("E063", f"malformed selector '{' '.join(str(w.value) for w in rule.words)}'",  # noqa: E731
                              rule.span, hint="selectors: default, first N, last N, "
                              "every K [from S], at I, after <selector>")
        kw = keyword.value
        if kw == "default" and shape == ("default", ()) and not values:
            return list(range(count)), insert
        if kw in ("first", "last", "at") and shape[1] == () and len(values) == 1:
            n = values[0]
            if kw == "at":
                if not 0 <= n < count:
                    d.error("E064", f"layer {n} is outside the stack (0..{count - 1})", rule.span)
                    return None
                return [n], insert
            if not 0 < n <= count:
                d.error("E064", f"'{kw} {n}' selects outside the stack of {count}", rule.span)
                return None
            return (list(range(n)) if kw == "first" else list(range(count - n, count))), insert
        if kw == "every" and ((shape[1] == () and len(values) == 1)
                              or (shape[1] == ("from",) and len(values) == 2)):
            k = values[0]
            if k <= 0:
                d.error("E064", f"'every {k}' needs a positive step", rule.span)
                return None
            start = values[1] if len(values) == 2 else k - 1  # every k: layers k-1, 2k-1, ...
            if not 0 <= start < count:
                d.error("E064", f"'from {start}' is outside the stack (0..{count - 1})", rule.span)
                return None
            return list(range(start, count, k)), insert
        bad()
        return None

    # -- warnings

    def unused(self, sec: SectionDef, model: Model) -> None:
        used = section_references(sec)
        for name, decl in sec.decls.items():
            # max_seq_len is read by cost, codegen and vlm checks even if no op names it
            if sec.origin.get(name) != sec.name or name in SPINES[sec.kind] or name in SETTINGS \
                    or name in used or name == "max_seq_len":
                continue
            what = "component" if name in model.components else "parameter"
            self.diags.warning("W001", f"{what} '{name}' is never used", decl.name_span)
        stacked = {s.block for s in model.layers} | {i.block for i in model.inserted}
        stack = sec.decls.get("layers")
        if isinstance(stack, ast.RuleAssign):  # a rule that failed is reported itself
            stacked |= {r.target for r in stack.rules}
        for name, block in [*model.blocks.items(), *model.modules.items()]:
            is_module = name in sec.modules
            if (sec.modules if is_module else sec.blocks)[name].owner != sec.name:
                continue
            if is_module and name not in used:
                self.diags.warning("W004", f"module '{name}' is never used", block.name_span,
                                   hint=f"use it as a component: `mlp = {name}()`")
            if not is_module and name not in stacked and model.layers:
                self.diags.warning("W003", f"block '{name}' is not used by the stack",
                                   block.name_span)
            # read off the source, so that a dataflow statement that failed to bind
            # (already an error) does not make its components look unused
            bdef = (sec.modules if is_module else sec.blocks)[name]
            applied: set[str] = set()
            for stmt in bdef.flow:
                _referenced_names(stmt.value, applied)
            if bdef.ret is not None:
                _referenced_names(bdef.ret.value, applied)
            for cname, comp in block.components.items():
                if cname not in applied and comp.op.role == "module":
                    self.diags.warning("W002", f"component '{cname}' of "
                                       f"{'module' if is_module else 'block'} '{name}' is never "
                                       "applied", comp.name_span)


def _reads_tensor(e: ast.Expr, tensors: set[str] | frozenset[str]) -> bool:
    if isinstance(e, ast.Ref):
        return len(e.parts) == 1 and e.parts[0] in tensors
    if isinstance(e, ast.Call):
        # `tensors` holds the components too: applying one yields a tensor,
        # while `max(0.5, f)` computes a number
        return e.func.dotted in tensors or any(_reads_tensor(a.value, tensors) for a in e.args)
    if isinstance(e, ast.BinOp):
        return _reads_tensor(e.left, tensors) or _reads_tensor(e.right, tensors)
    if isinstance(e, ast.Neg):
        return _reads_tensor(e.operand, tensors)
    return False


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return f"the number {v}"
    if isinstance(v, str):
        return f"the string {v!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, ComponentValue):
        return f"the {v.component.op.name} component '{v.component.name}'"
    return "nothing" if v is None else type(v).__name__


def new_binder(program: Program, diags: Diagnostics) -> _Binder:
    """A binder for sections bound outside this module (plans: compiler/plans.py)."""
    return _Binder(program, diags)


def bind_program(program: Program, diags: Diagnostics, names: list[str]) -> dict[str, Model]:
    """Bind the named model sections (and what they refer to)."""
    binder = _Binder(program, diags)
    return {name: binder.model(program.sections[name]) for name in names
            if program.sections[name].kind in SPINES}
