"""A module of the spec's own (`module geglu(x) { ... }`) as an op.

Binding gives a module's body as a `Block` (components, dataflow, return); here
it becomes an `OpDef` like a registry op's, so that everything that reads a
component's op — parameter layout, FLOPs, shapes, tensor-parallel layout — reads
a module the same way:

* parameters nest under the component: `layers.3.mlp.gate.weight` for a
  component `mlp = geglu()` whose module declares `gate = linear(...)`;
* shapes: an input has the shape the first op applied to it expects, the output
  the shape the dataflow computes (lowering inlines the body, so every inner op
  and element-wise product is checked by compiler/checks/shapes.py itself);
* tensor parallelism is derived ("column in, row out"), see `derive_tp`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .diagnostics import Span
from .flow import FAdd, FApply, Flow, FMul, FRef, FSub, children, walk
from .ops import OpDef


class Block(Protocol):
    """A bound module body (compiler/bind.py's `Block`, which builds its op here)."""

    name: str
    inputs: tuple[str, ...]
    components: Mapping[str, Any]  # name → bind.Component
    flow: Sequence[tuple[str, Flow, Span]]
    ret: Flow | None


def class_name(module: str) -> str:
    """The generated nn.Module class of a module: `geglu` → `Geglu`, `primer_mlp` → `PrimerMlp`."""
    return "".join(part[:1].upper() + part[1:] for part in module.split("_") if part)


def placeholder_op(module: str) -> OpDef:
    """The op of a module component that failed to bind (its errors are reported)."""
    return OpDef(name=module, doc="", args=(), class_name=class_name(module))


def module_op(body: Block) -> OpDef:
    inputs = input_shapes(body)
    output = output_shape(body, inputs)
    weights = module_weights(body)
    tp = derive_tp(body)
    applications = [f for _, expr, _ in body.flow for f in walk(expr) if isinstance(f, FApply)]
    if body.ret is not None:
        applications += [f for f in walk(body.ret) if isinstance(f, FApply)]

    def flops(a, seq_len: int) -> int:
        return sum(body.components[f.component].op.flops(body.components[f.component].args,
                                                          seq_len) for f in applications)

    sizes = split_sizes(body, tp)
    return OpDef(
        name=body.name, doc=f"module {body.name} of the spec", args=(),
        split_by={"tp": tuple(sizes)} if sizes else {},
        inputs=lambda a: inputs, output=lambda a: output,
        weights=lambda a: dict(weights), flops=flops,
        causal=lambda a: all(c.op.causal(c.args) for c in body.components.values()),
        class_name=class_name(body.name), tp=tp,
    )


def split_sizes(body: Block, tp: Mapping[str, str]) -> dict[str, int]:
    """The features tensor parallelism splits in the module's own linear maps: a
    column-split map's outputs, a row-split map's inputs, by `{map}.out_features`
    and `{map}.in_features`: a module component's arguments, which the plan's tp
    degree must divide (compiler/plans.py, E122), as an op's `split_by` says."""
    out = {}
    for sub, style in tp.items():
        comp = body.components.get(sub)
        if comp is None or not comp.op.splittable:
            continue  # a nested op's or module's own sizes are its own arguments
        rows, cols = comp.op.weights(comp.args)["weight"]
        out[f"{sub}.out_features" if style == "colwise" else f"{sub}.in_features"] = \
            rows if style == "colwise" else cols
    return out


def _shape(f: Flow, body: Block, env: dict):
    if isinstance(f, FRef):
        return env.get(f.name)
    if isinstance(f, FApply):
        comp = body.components[f.component]
        return comp.op.output(comp.args) if comp.ok else None
    if isinstance(f, FAdd | FMul | FSub):
        return _shape(f.left, body, env)
    return _shape(f.operand, body, env)


def input_shapes(body: Block) -> tuple:
    """Each input's shape: what the first op applied directly to it expects."""
    found: dict[str, object] = {}
    exprs = [expr for _, expr, _ in body.flow] + ([body.ret] if body.ret is not None else [])
    for expr in exprs:
        for f in walk(expr):
            if not isinstance(f, FApply):
                continue
            comp = body.components[f.component]
            if not comp.ok:
                continue
            expected = comp.op.inputs(comp.args)
            for i, a in enumerate(f.args):
                if isinstance(a, FRef) and a.name in body.inputs and a.name not in found \
                        and i < len(expected):
                    found[a.name] = expected[i]
    return tuple(found.get(n) for n in body.inputs)


def output_shape(body: Block, inputs: tuple):
    env = dict(zip(body.inputs, inputs, strict=True))
    for name, expr, _ in body.flow:
        env[name] = _shape(expr, body, env)
    return _shape(body.ret, body, env) if body.ret is not None else None


def module_weights(body: Block) -> dict:
    """Parameter FQN suffix → shape, each component's nested under its name."""
    out = {}
    for cname, comp in body.components.items():
        if comp.ok and comp.op.role == "module":
            out.update({f"{cname}.{k}": v for k, v in comp.op.weights(comp.args).items()})
    return out


def derive_tp(body: Block) -> dict[str, str]:
    """Submodule → "colwise" | "rowwise" for tensor parallelism: column in, row out.

    A linear map reading a whole (replicated) tensor is split by columns, its
    output then sharded along the last dimension; element-wise functions,
    products, differences and sums keep a sharded tensor sharded when all their
    operands are; a linear map reading a sharded tensor is split by rows, its
    output whole again (summed across ranks). Ops (and nested modules) read
    whole tensors and keep their own layouts, nested under their name. Where a
    sharded tensor would meet a whole one, or leave the module, the linear maps
    that sharded it stay whole instead, until the layout is consistent: GeGLU's
    gate and up split by columns and down by rows; a gate multiplied with an
    attention's (whole) output stays whole."""
    whole: set[str] = set()
    while True:
        result = _try_tp(body, whole)
        if isinstance(result, dict):
            return result
        assert not result <= whole, "each conflict keeps a new linear map whole"
        whole |= result


def _try_tp(body: Block, whole: set[str]) -> dict[str, str] | set[str]:
    """The layout keeping the `whole` linear maps unsplit, or the column-split maps to
    keep whole because a tensor they shard meets a whole one."""
    styles: dict[str, str] = {}

    # a value → whether it is sharded, and the column-split maps that sharded it
    def value(f: Flow, env: dict) -> tuple[bool, frozenset[str]]:
        if isinstance(f, FRef):
            return env.get(f.name, (False, frozenset()))
        parts = [value(c, env) for c in children(f)]
        sharded = [p for p in parts if p[0]]
        cols = frozenset().union(*(p[1] for p in sharded))
        if isinstance(f, FApply):
            comp = body.components[f.component]
            if comp.op.splittable and comp.module is None and f.component not in whole \
                    and len(parts) == 1:
                style = "rowwise" if parts[0][0] else "colwise"
                if styles.setdefault(f.component, style) != style:
                    raise _Conflict(cols | {f.component})
                return (True, frozenset({f.component})) if style == "colwise" \
                    else (False, frozenset())
            if sharded:
                raise _Conflict(cols)
            return False, frozenset()
        if isinstance(f, FAdd | FMul | FSub) and len(sharded) == 1:
            raise _Conflict(cols)
        return (bool(sharded), cols)

    try:
        env: dict = {}
        for name, expr, _ in body.flow:
            env[name] = value(expr, env)
        if body.ret is not None:
            sharded, cols = value(body.ret, env)
            if sharded:
                raise _Conflict(cols)
    except _Conflict as c:
        return set(c.names)
    out: dict[str, str] = {}
    for cname, comp in body.components.items():
        if cname in styles and cname not in whole:
            out[cname] = styles[cname]
        elif not comp.op.splittable:
            out.update({f"{cname}.{sub}": style for sub, style in comp.op.tp.items()})
    return dict(sorted(out.items()))


class _Conflict(Exception):
    def __init__(self, names):
        super().__init__()
        self.names = frozenset(names)

