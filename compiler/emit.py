"""Code generation: a checked model → the files of its Python package.

`model.py` is rendered from templates/model.py.j2, which wires config, blocks
and Transformer, around the op code copied from compiler/ops/*/modules.py by
compiler/modular.py: only the definitions, features and code paths the spec
uses. Everything is rendered from sorted, resolved data, so the same spec
gives byte-identical output. Names in the output are validated identifiers
(the grammar's NAME, minus reserved words: checks/names.py) and every string
is written as an escaped literal (`pyrepr`), so a spec cannot inject code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass

import jinja2

from . import ast
from .bind import Block, Component, ComponentValue, FAdd, FApply, Flow, FRef, FScale, Model
from .compose import class_name, input_shapes
from .cost import cost, vlm_cost
from .driver import Compilation
from .flow import FAct, FMul, FSub, children, replace_children, walk
from .functions import ACTIVATIONS
from .modular import copy_definitions, init_defaults
from .ops import OPS, NestedCall, patch_tokens
from .plans import layer_units, plan_data, tp_plan, vlm_plan_data
from .vlm import DECODER_ARGS

LINE = 100  # the line length ruff formats the generated code to
TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
FORGEC_VERSION = "0.1.0"
# Packed documents attend span by span, one SDPA call per document (DocumentMask), in a
# model whose sequences reach this length; below it one call with a (B, 1, S, S) boolean
# mask is faster. benchmarks/bench_thresholds.py on the CPU (forward + backward, 4 rows,
# documents of 64 to 128 tokens), span by span / one masked call: 1.6-2.2x at 128 tokens,
# 1.25-1.3x at 256, 0.7-0.8x at 512, 0.3-0.35x at 2048. On a GPU the spans are a
# FlexAttention block mask, which has nothing to skip below a few 128-token blocks either.
DOCUMENT_SPANS_FROM = 512


def pyrepr(value) -> str:
    """A Python literal for a resolved spec value (double-quoted, escaped strings)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list | tuple):
        inner = ", ".join(pyrepr(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) and len(value) == 1 else (
            f"({inner})" if isinstance(value, tuple) else f"[{inner}]")
    raise AssertionError(f"no literal for {value!r}")


def pyformat(value, indent: int = 0, used: int = 0) -> str:
    """A Python literal for nested data, laid out as ruff formats it: on one line
    when it fits (`used` columns already taken on that line, plus a trailing
    comma), else one item per line with trailing commas."""
    one = _one_line(value)
    if indent + used + len(one) + 1 <= LINE or not isinstance(value, dict | list | tuple) \
            or not value:
        return one
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{pyrepr(k)}: {pyformat(v, indent + 4, len(pyrepr(k)) + 2)},"
                 for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{pyformat(v, indent + 4)}," for v in value]
    opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
    return opening + "\n" + "\n".join(items) + "\n" + " " * indent + closing


def _one_line(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{pyrepr(k)}: {_one_line(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_one_line(v) for v in value) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(_one_line(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return pyrepr(value)


def _tuple_literal(items: list) -> str:
    """A tuple literal as ruff formats it after `NAME = ` at module level."""
    one = pyrepr(tuple(items))
    if len(one) + 12 <= LINE:
        return one
    return "(\n" + "".join(f"    {pyrepr(i)},\n" for i in items) + ")"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    )
    env.filters["pyrepr"] = pyrepr
    env.filters["pyrepr_tuple"] = _tuple_literal
    return env


class Code(str):
    """Python source that stands for a value: a ModelConfig field or an expression of them."""


class ConfigView:
    """Which ModelConfig fields the generated code reads, and the spec's arguments as
    Python over them.

    An argument naming a parameter reads its field (`config.dim`); a derived default
    follows the op's rule (`config.dim // config.n_heads`); any other size the spec
    writes — a number, `3 * dim`, `ffn_hidden(dim, ...)` — becomes a field of its own
    (`mlp_hidden`), recorded with the fields it was computed from, so that each size
    appears once, in ModelConfig, and a ModelConfig that changes `dim` but not
    `mlp_hidden` is refused as inconsistent."""

    def __init__(self, model: Model):
        self.model = model
        self.params = {k: v for k, v in model.params.items()
                       if isinstance(v, int | float) and not isinstance(v, bool)
                       and not k.startswith("_")}
        self.computed: dict[str, tuple[object, tuple[str, ...]]] = {}
        self.read: set[str] = set()
        # other sections whose parameters a `SECTION.PARAM` reference reads (a VLM's
        # adapter reads its text model's and vision encoder's): name → (view, prefix)
        self.others: dict[str, tuple[ConfigView, str]] = {}

    def field(self, name: str, prefix: str) -> Code:
        self.read.add(name)
        return Code(f"{prefix}.{name}")

    def expr(self, e, value, prefix: str) -> Code | None:
        """Python for a spec expression over model parameters, or None."""
        if isinstance(e, ast.Ref) and len(e.parts) == 1 and e.parts[0] in self.params \
                and self.params[e.parts[0]] == value:
            return self.field(e.parts[0], prefix)
        if isinstance(e, ast.Ref) and len(e.parts) == 2 and e.parts[0] in self.others:
            view, other_prefix = self.others[e.parts[0]]
            if view.params.get(e.parts[1]) == value:
                return view.field(e.parts[1], other_prefix)
        if isinstance(e, ast.Int | ast.Float) and not isinstance(e.value, bool):
            return Code(pyrepr(e.value))
        if isinstance(e, ast.BinOp) and e.op in ("+", "-", "*", "/", "//"):
            parts = []
            for side in (e.left, e.right):
                code = self.expr(side, _value_of(side, self.params), prefix)
                if code is None:
                    return None
                parts.append(f"({code})" if isinstance(side, ast.BinOp) else code)
            op = "//" if e.op == "/" and isinstance(value, int) else e.op
            return Code(f"{parts[0]} {op} {parts[1]}")
        return None

    def arg(self, comp: Component, name: str, prefix: str, owner: str) -> Code | None:
        """Python for an argument of a component: from its expression in the spec, from
        the op's rule for a derived default, or a computed field of its own."""
        value = comp.args.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        e = comp.arg_exprs.get(name)
        if e is None:
            rule = comp.op.derived_code.get(name)
            if rule is None:
                return None
            refs = {}
            for other in comp.args:
                if "{" + other + "}" in rule:
                    code = self.arg(comp, other, prefix, owner)
                    if code is None:
                        return None
                    bare = rule == "{" + other + "}" or " " not in code
                    refs[other] = code if bare else Code(f"({code})")
            return Code(rule.format(**refs))
        if isinstance(e, ast.Ref):
            return self.expr(e, value, prefix)
        spec_arg = comp.op.arg(name)
        if spec_arg is None or spec_arg.type not in ("size", "int"):
            return self.expr(e, value, prefix)
        field_name = f"{comp.name}_{name}"
        if field_name in self.params or (field_name in self.computed
                                         and self.computed[field_name][0] != value):
            field_name = f"{owner}_{field_name}"
        deps = tuple(sorted({p for p in _refs(e) if p in self.params}))
        self.computed[field_name] = (value, deps)
        return self.field(field_name, prefix)

    def computed_from(self) -> dict[str, tuple[str, ...]]:
        """The fields of computed sizes that depend on other fields."""
        return {k: deps for k, (_, deps) in self.computed.items() if deps}


def _refs(e) -> list[str]:
    if isinstance(e, ast.Ref):
        return [e.parts[0]]
    if isinstance(e, ast.BinOp):
        return _refs(e.left) + _refs(e.right)
    if isinstance(e, ast.Neg):
        return _refs(e.operand)
    if isinstance(e, ast.Call):
        return [r for a in e.args for r in _refs(a.value)]
    return []


def _value_of(e, params: dict):
    if isinstance(e, ast.Ref) and len(e.parts) == 1:
        return params.get(e.parts[0])
    if isinstance(e, ast.Int | ast.Float):
        return e.value
    if isinstance(e, ast.BinOp):
        left, right = _value_of(e.left, params), _value_of(e.right, params)
        if not isinstance(left, int | float) or not isinstance(right, int | float):
            return None
        if e.op == "/":
            return left // right if isinstance(left, int) and isinstance(right, int) \
                else left / right
        return {"+": left + right, "-": left - right, "*": left * right,
                "//": left // right if right else None}.get(e.op)
    return None


def _inline(value) -> str:
    if isinstance(value, Code):
        return value
    if isinstance(value, NestedCall):
        return f"{value.class_name}({', '.join(f'{k}={_inline(v)}' for k, v in value.kwargs)})"
    return pyrepr(value)


def call_lines(prefix: str, func: str, kwargs: list[str] | list[tuple[str, object]],
               indent: int, suffix: str = "") -> list[str]:
    """`prefix + func(args) + suffix` formatted as ruff would: one line, the
    arguments hugged on one line, or one argument per line (recursively)."""
    pad = " " * indent
    pairs = [(k, None) if isinstance(k, str) else k for k in kwargs]
    flat = [k if v is None else f"{k}={_inline(v)}" for k, v in pairs]
    one = f"{pad}{prefix}{func}({', '.join(flat)}){suffix}"
    if len(one) <= LINE:
        return [one]
    hugged = f"{pad}    {', '.join(flat)}"
    if len(hugged) <= LINE:
        return [f"{pad}{prefix}{func}(", hugged, f"{pad}){suffix}"]
    lines = [f"{pad}{prefix}{func}("]
    for (k, v), text in zip(pairs, flat, strict=True):
        if len(pad) + 4 + len(text) + 1 <= LINE or not isinstance(v, NestedCall):
            lines.append(f"{pad}    {text},")
        else:
            lines += call_lines(f"{k}=", v.class_name, list(v.kwargs), indent + 4, suffix=",")
    return lines + [f"{pad}){suffix}"]


def _ctor(comp: Component, union: frozenset[str], cfg: ConfigView | None = None,
          prefix: str = "config", owner: str = "") -> tuple[str, list[tuple[str, object]]]:
    """Class and constructor arguments of a component; with `cfg`, the arguments the
    spec derives from the model's parameters read them from ModelConfig."""
    defaults = init_defaults(comp.op.class_name)
    # left out: values equal to the class's defaults, and defaults the op derives (the
    # class derives them the same way, from its default None) where the spec gave none
    kwargs = [(k, v) for k, v in comp.op.ctor(comp.args, union).items()
              if not (k in defaults and type(v) is type(defaults[k]) and v == defaults[k])
              and not (k in defaults and defaults[k] is None and k in comp.op.derived_code
                       and k not in comp.arg_exprs)]
    if cfg is None:
        return comp.op.class_name, kwargs
    out = []
    for k, v in kwargs:
        if isinstance(v, NestedCall):  # an inline component (a router) given the op's sizes
            inner = comp.args[k].component
            inner_defaults = init_defaults(v.class_name)
            v = NestedCall(v.class_name, tuple(
                (rk, rv) for rk, rv in v.kwargs if not (
                    rk in inner_defaults and type(rv) is type(inner_defaults[rk])
                    and rv == inner_defaults[rk])))
            v = NestedCall(v.class_name, tuple(
                (rk, (cfg.arg(comp, rk, prefix, owner) or rv)
                 if rk in comp.args and rv is comp.args[rk] else
                 (cfg.arg(inner, rk, prefix, owner) or rv)
                 if rk in inner.args and rv is inner.args[rk] else rv) for rk, rv in v.kwargs))
        elif k in comp.args and v is comp.args[k]:
            v = cfg.arg(comp, k, prefix, owner) or v
        out.append((k, v))
    return comp.op.class_name, out


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


@dataclass
class _Line:
    source: str
    code: str


class _BlockWriter:
    """Straight-line forward code for one block, from its dataflow."""

    def __init__(self, block: Block, hidden, kv_cache: bool, fusion: Component | None = None):
        self.block = block
        self.fusion = fusion  # a routing fusion: its hooks write the routed components' calls
        self.hidden = hidden
        self.kv_cache = kv_cache
        # each attention application owns one KV cache slot, in evaluation order
        self.cache_slot = {span: i for i, span in enumerate(_attention_applications(block))}
        self.n_attention = len(self.cache_slot)
        self.temps: set[str] = set()

    def shape(self, f: Flow, env: dict):
        if isinstance(f, FRef):
            return env.get(f.name, self.hidden)
        if isinstance(f, FApply):
            comp = self.block.components[f.component]
            return comp.op.output(comp.args)
        if isinstance(f, FAdd | FMul | FSub):
            return self.shape(f.left, env)
        return self.shape(f.operand, env)

    def expr(self, f: Flow) -> str:
        if isinstance(f, FRef):
            return f.name
        if isinstance(f, FApply):
            comp = self.block.components[f.component]
            args = ", ".join(self.expr(a) for a in f.args)
            kv = ""
            if f.span in self.cache_slot and self.kv_cache:
                kv = ", kv_cache" if self.n_attention == 1 else f", caches[{self.cache_slot[f.span]}]"
            if self.fusion is not None:
                routed = self.fusion.op.fusion.call(comp.op, comp.args, f"self.{f.component}",
                                                    args, kv)
                if routed is not None:
                    return routed
            return comp.op.call.format(m=f"self.{f.component}", x=args, kv=kv,
                                       **comp.op.call_fields(comp.args))
        if isinstance(f, FAdd):
            right = self.expr(f.right)
            if isinstance(f.right, FAdd | FSub):
                right = f"({right})"  # keep the spec's summation order
            return f"{self.expr(f.left)} + {right}"
        if isinstance(f, FSub):
            right = self.expr(f.right)
            if isinstance(f.right, FAdd | FSub):
                right = f"({right})"
            return f"{self.expr(f.left)} - {right}"
        if isinstance(f, FMul):  # the spec's order of products is kept, too
            left, right = self.expr(f.left), self.expr(f.right)
            if isinstance(f.left, FAdd | FSub):
                left = f"({left})"
            if isinstance(f.right, FAdd | FSub | FMul | FScale):
                right = f"({right})"
            return f"{left} * {right}"
        if isinstance(f, FAct):
            act = ACTIVATIONS[f.name]
            inner = self.expr(f.operand)
            if isinstance(f.operand, FAdd | FSub | FMul | FScale) and "{x} " in act.code:
                # an operator follows the operand
                inner = f"({inner})"
            return act.code.format(x=inner, **{a.name: pyrepr(v)
                                               for a, v in zip(act.args, f.args, strict=True)})
        inner = self.expr(f.operand)
        if isinstance(f.operand, FAdd | FSub | FMul):
            inner = f"({inner})"
        return f"{pyrepr(f.factor)} * {inner}"

    def statement(self, target: str | None, f: Flow, env: dict, indent: int) -> list[str]:
        """Code for `target = f` (or `return f`); nested calls are hoisted into
        named temporaries while the line is longer than the formatter allows."""
        pad = " " * indent
        pre: list[str] = []
        while True:
            line = f"{pad}{'return ' if target is None else f'{target} = '}{self.expr(f)}"
            nested = _first_nested_apply(f) if len(line) > LINE else None
            if nested is None:
                comment = f"  # {_shape(self.shape(f, env))}" if target is not None else ""
                if len(line) > LINE:
                    return pre + _right_hand_split(line, indent)
                return pre + [line + comment if len(line + comment) <= LINE else line]
            temp = nested.component
            while temp in self.temps or temp in env:
                temp += "_"
            self.temps.add(temp)
            pre += self.statement(temp, nested, env, indent)
            env[temp] = self.shape(nested, env)
            f = _replace(f, nested, FRef(temp, nested.span))


def _right_hand_split(line: str, indent: int) -> list[str]:
    """Split a too-long line at its last bracket pair, as ruff (black) formats it."""
    if not line.endswith(")"):
        return [line]
    depth, open_at = 0, None
    for i in range(len(line) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(line[i], 0)
        if depth == 0:
            open_at = i
            break
    assert open_at is not None
    head, body = line[: open_at + 1], line[open_at + 1 : -1]
    pad = " " * indent
    if len(pad) + 4 + len(body) <= LINE:
        return [head, f"{pad}    {body}", f"{pad})"]
    args, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            args.append(body[start:i].strip())
            start = i + 1
    args.append(body[start:].strip())
    return [head, *[f"{pad}    {a}," for a in args], f"{pad})"]


def _component_at(block: Block, span) -> str:
    """The component applied at `span` in the block's dataflow."""
    return next(f.component for expr in _expressions(block) for f in walk(expr)
                if isinstance(f, FApply) and f.span == span)


def _expressions(block: Block) -> list[Flow]:
    return [f for _, f, _ in block.flow] + ([block.ret] if block.ret is not None else [])


def _attention_applications(block: Block) -> list:
    return [f.span for expr in _expressions(block) for f in walk(expr)
            if isinstance(f, FApply) and block.components[f.component].op.caches]


def _first_nested_apply(f: Flow) -> FApply | None:
    """The first application used as an argument of another, in evaluation order."""
    if isinstance(f, FApply):
        for a in f.args:
            inner = _first_nested_apply(a)
            if inner is not None:
                return inner
            if isinstance(a, FApply):
                return a
        return None
    if isinstance(f, FAdd | FMul | FSub):
        left = _first_nested_apply(f.left)
        if left is not None:
            return left
        if isinstance(f.left, FApply) and isinstance(f.right, FApply | FAdd | FMul | FSub | FAct):
            return f.left
        return _first_nested_apply(f.right)
    if isinstance(f, FScale):
        return _first_nested_apply(f.operand)
    if isinstance(f, FAct):
        inner = _first_nested_apply(f.operand)
        return inner if inner is not None or not isinstance(f.operand, FApply) else f.operand
    return None


def _replace(f: Flow, old: Flow, new: Flow) -> Flow:
    if f is old:
        return new
    if isinstance(f, FRef):
        return f
    return replace_children(f, tuple(_replace(c, old, new) for c in children(f)))


def _parts(comp: Component) -> list[Component]:
    """A component, or for one of the model's modules the components inside it."""
    if comp.module is None:
        return [comp]
    return [y for x in comp.module.components.values() for y in _parts(x)]


def _modules_used(blocks: list[Block]) -> list[Block]:
    """The modules the blocks use, each after the modules it uses, in order of first use."""
    out: dict[str, Block] = {}

    def visit(comp: Component) -> None:
        if comp.module is None or comp.module.name in out:
            return
        for inner in comp.module.components.values():
            visit(inner)
        out[comp.module.name] = comp.module

    for block in blocks:
        for comp in block.components.values():
            visit(comp)
    return list(out.values())


def _module_class(env, module: Block, features: frozenset[str], cfg: ConfigView) -> str:
    """The nn.Module class of a module of the spec's own: its components built from
    ModelConfig, its dataflow as a straight-line forward with shapes and source lines."""
    shapes = dict(zip(module.inputs, input_shapes(module), strict=True))
    writer = _BlockWriter(module, None, kv_cache=False)
    # the linear map producing the output starts like the built-in MLPs' down_proj
    # and attention's o_proj: with the model's output-projection std
    out_map = module.ret.component if isinstance(module.ret, FApply) else None
    comps = []
    for cname, x in module.components.items():
        if not x.op.definitions:
            continue
        init_args = x.op.init_args
        if x.module is not None:
            ctor = f"self.{cname} = {x.op.class_name}(config)"
        else:
            func, kwargs = _ctor(x, features, cfg, "config", module.name)
            ctor = "\n".join(call_lines(f"self.{cname} = ", func, kwargs, 8)).lstrip()
            if cname == out_map and x.op.splittable:
                init_args = "out_std, out_std"
        comps.append({"name": cname, "ctor": ctor, "init_args": init_args})
    lines = []
    for name, f, span in module.flow:
        code = writer.statement(name, f, shapes, 8)
        shapes[name] = writer.shape(f, shapes)
        lines.append(_Line(f"{span.file}:{span.line}", "\n".join(code).lstrip()))
    code = writer.statement(None, module.ret, shapes, 8)
    lines.append(_Line(f"{module.ret_span.file}:{module.ret_span.line}", "\n".join(code).lstrip()))
    out = writer.shape(module.ret, shapes)
    signature = ", ".join(f"{n}: torch.Tensor" for n in module.inputs)
    described = ", ".join(f"{n} {_shape(s) if s else '?'}" for n, s in
                          zip(module.inputs, input_shapes(module), strict=True))
    described += f" → {_shape(out) if out else '?'}"
    one = f"    def forward(self, {signature}) -> torch.Tensor:"
    return env.get_template("module.py.j2").render(
        class_name=class_name(module.name), name=module.name,
        source=f"{module.name_span.file}:{module.name_span.line}", components=comps,
        lines=lines, signature=one if len(one) <= LINE else None, inputs=module.inputs,
        shapes=described,
    ).rstrip("\n")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    out, start, prev = [], None, None
    for i in indices + [None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = i
    return ", ".join(out)


def source_hash(comp: Compilation) -> str:
    """Hash of the spec's sources (root and imports), independent of where they lie."""
    h = hashlib.sha256()
    for src in sorted(comp.program.sources, key=lambda s: s.path):
        h.update(os.path.basename(src.path).encode() + b"\0" + src.text.encode() + b"\0")
    return h.hexdigest()


def emit_package(comp: Compilation, name: str) -> dict[str, str]:
    """File name → content of the package for the model or vlm `name`."""
    package = name
    vlm = comp.vlms.get(name)
    model = comp.models[vlm.text if vlm else name]
    vision = comp.models[vlm.vision] if vlm else None
    graph = comp.graphs[model.name]
    spec = comp.program.root
    c = vlm_cost(comp, vlm) if vlm else cost(graph)
    kv_cache = bool(c.supports_kv_cache)
    hooks = vlm.fusion.op.fusion if vlm else None  # how image tokens reach the decoder
    routed = vlm.fusion if hooks and hooks.routes else None  # tokens choose by modality
    copies = routed is not None and hooks.routes == "block"  # a copy of each per modality

    def replaced(op) -> bool:
        """Whether the routing fusion replaces a decoder op by its own module."""
        return routed is not None and not copies and hooks.routes in op.slots

    env = _env()
    header = (f"# Generated by forgec from {spec} — do not edit.\n"
              f"# Regenerate with: forgec build --update {spec}")

    emb, norm, head = (model.components[n] for n in ("token_embedding", "norm", "output_head"))
    dim, vocab = emb.args["dim"], emb.args["vocab"]
    hidden = ("B", "S", dim)
    rope_comp = next((x for x in model.all_components() if "positions" in x.op.slots), None)
    n_layers = len(model.layers)
    max_seq_len = _max_seq_len(model, rope_comp)
    cfg = ConfigView(model)  # the text model's sizes, read from ModelConfig
    vcfg = ConfigView(vision) if vision is not None else None  # the encoder's: VisionConfig

    # blocks in use, in order of first use
    layer_kinds = list(dict.fromkeys(s.block for s in model.layers))
    inserted_kinds = list(dict.fromkeys(i.block for i in model.inserted))
    single = len(layer_kinds) == 1
    class_of = {k: "TransformerBlock" if single else f"{_camel(k)}Block" for k in layer_kinds}
    for k in inserted_kinds:
        if k not in class_of:
            class_of[k] = f"{_camel(k)}Block"

    used_blocks = [model.blocks[k] for k in class_of]
    # in the order a reader meets them: embedding, blocks, norm, head, then the vision side
    components = [*([rope_comp] if rope_comp is not None else []), emb,
                  *[x for b in used_blocks for x in b.components.values()], norm, head]
    vision_kinds: list[str] = []
    if vision is not None:
        vision_kinds = list(dict.fromkeys(s.block for s in vision.layers))
        components += [vision.components["patch_embedding"],
                       *[x for x in vision.all_components() if "vision_positions" in x.op.slots],
                       *[x for k in vision_kinds for x in vision.blocks[k].components.values()],
                       vision.components["norm"], vlm.adapter]
        if vlm.fusion.op.definitions:
            components.append(vlm.fusion)
    # a module's class is generated (below), the op code of its parts is copied
    modules = _modules_used(used_blocks)
    components = [y for x in components for y in _parts(x)]
    if routed is not None and not copies:  # its modules replace those of a slot
        components = [x for x in components if not replaced(x.op) or x in
                      [y for k in vision_kinds for y in vision.blocks[k].components.values()]]
    # routers are written inline as an argument, just before the op that routes
    components = [y for x in components for y in (
        *[v.component for v in x.args.values()
          if isinstance(v, ComponentValue) and v.component.op.role == "router"], x)]
    # features: which optional code paths of the op modules the model uses
    features = frozenset({"kv_cache"} if kv_cache else ()).union(
        {"document_spans"} if max_seq_len >= DOCUMENT_SPANS_FROM else (),
        *(x.op.features(x.args) for x in components))
    modalities = pyrepr(tuple(vlm.fusion.args[hooks.modalities_arg])) if routed else None
    # the caches make_kv_caches builds: each caching op's class (attention's KVCache)
    cache_classes = list(dict.fromkeys(x.op.cache_class for x in components if x.op.caches)) \
        or ["KVCache"]
    roots = [*(cache_classes if kv_cache else []),
             *[name for x in components for name in x.op.definitions]]
    if "document_spans" in features and not any(x.op.mask for x in components):
        # attention_masks (the template's) builds packed documents' masks even where no
        # component reads them (a model of recurrent mixers only)
        roots.append("DocumentMask")
    op_classes = copy_definitions(roots, features)

    mask_kinds = sorted({x.op.mask(x.args) for b in used_blocks for x in b.components.values()
                         if x.op.mask}) or ["causal"]
    # recurrent mixers read the step's padding beside the masks (OpDef.reads_padding)
    pads = any(x.op.reads_padding for b in used_blocks for x in b.components.values())
    kinds = [{"name": k, "causal": k.startswith("causal"),
              "window": int(k.split("_w")[1]) if "_w" in k else 0} for k in mask_kinds]
    for k in kinds:  # a window the spec names is read from ModelConfig
        if k["window"]:
            att = next(x for b in used_blocks for x in b.components.values()
                       if x.op.mask and x.op.mask(x.args) == k["name"])
            k["window"] = cfg.arg(att, "window", "config", "model") or k["window"]
    windows = any(k["window"] for k in kinds)
    masks_args = (["b", "s", "start=start", "key_valid=key_valid"] if kv_cache
                  else ["b", "s", "key_valid=padding"]) + ["doc_ids=doc_ids", "device=h.device"]
    masks_call = "\n".join(call_lines(
        "attn_mask = ", "attention_masks",
        masks_args + (["config=self.config"] if windows else []), 8))

    blocks = []
    vision_class = {k: f"Vision{_camel(k)}Block" for k in vision_kinds}
    for kind, cls in [*class_of.items(), *vision_class.items()]:
        in_vision = kind in vision_class and cls == vision_class[kind]
        block = (vision if in_vision else model).blocks[kind]
        block_hidden = ("B", "S", vision.components["norm"].args["dim"]) if in_vision else hidden
        block_fusion = None if in_vision else routed
        writer = _BlockWriter(block, block_hidden, kv_cache and not in_vision, block_fusion)
        comps = []
        for cname, x in block.components.items():
            if not x.op.definitions:
                continue
            if x.module is not None:  # the model's own module: its class reads ModelConfig
                comps.append({"name": cname, "ctor": f"self.{cname} = {x.op.class_name}(config)",
                              "init_args": x.op.init_args, "copies": False})
                continue
            if block_fusion is not None and replaced(x.op):  # the fusion's module instead
                func, kwargs = _fusion_ctor(vlm.fusion, features, cfg)
                lines = call_lines(f"self.{cname} = ", func, kwargs, 8)
                comps.append({"name": cname, "ctor": "\n".join(lines).lstrip(),
                              "init_args": vlm.fusion.op.init_args, "copies": False})
                continue
            func, kwargs = _ctor(x, features, vcfg if in_vision else cfg, "config", kind)
            if block_fusion is not None and copies:  # one copy per modality
                lines = _copies_ctor(cname, func, kwargs)
            else:
                lines = call_lines(f"self.{cname} = ", func, kwargs, 8)
            comps.append({"name": cname, "ctor": "\n".join(lines).lstrip(),
                          "init_args": x.op.init_args,
                          "copies": block_fusion is not None and copies})
        lines: list[_Line] = []
        shapes = {block.inputs[0]: block_hidden}
        for name, f, span in block.flow:
            code = writer.statement(name, f, shapes, 8)
            shapes[name] = writer.shape(f, shapes)
            lines.append(_Line(f"{span.file}:{span.line}", "\n".join(code).lstrip()))
        ret_span = block.ret_span
        code = writer.statement(None, block.ret, shapes, 8)
        lines.append(_Line(f"{ret_span.file}:{ret_span.line}", "\n".join(code).lstrip()))
        n_att = writer.n_attention
        held = [block.components[_component_at(block, span)].op.cache_class
                for span in _attention_applications(block)]
        if kv_cache and n_att > 1 and not in_vision:
            lines.insert(0, _Line(f"{block.span.file}:{block.span.line}",
                                  f"caches = (None,) * {n_att} if kv_cache is None else kv_cache"))
        in_layers = [s.index for s in (vision if in_vision else model).layers if s.block == kind]
        keys = sorted({x.op.mask(x.args) for x in block.components.values() if x.op.mask})
        blocks.append({
            "name": kind, "class_name": cls, "vision": in_vision, "routed": bool(block_fusion),
            "vision_mask": "{" + ", ".join(f"{pyrepr(k)}: None" for k in keys) + "}",
            "base": "TransformerBlock" if not single and kind in layer_kinds and not in_vision
            else "nn.Module",
            "source": f"{block.name_span.file}:{block.name_span.line}",
            "layers": _ranges(in_layers) if (not single or in_vision) and in_layers else "",
            "components": comps, "lines": lines, "input": block.inputs[0],
            "uses_mask": any(x.op.mask or x.op.reads_padding for x in block.components.values()),
            "kv_type": (f"{held[0] if held else 'KVCache'} | None" if n_att <= 1 else
                        f"tuple[{' | '.join(dict.fromkeys(held))}, ...] | None")
            if kv_cache and not in_vision else "None",
            "first_cache": "kv_cache" if n_att <= 1 else "kv_cache[0]",
        })
    dispatch = None
    if not single:
        entries = [f"{s.index}: {class_of[s.block]}" for s in model.layers]
        table = "{" + ", ".join(entries) + "}"
        if len(f"BLOCK_OF_LAYER = {table}") > LINE:  # one entry a line, as ruff formats it
            table = "{\n" + "".join(f"    {e},\n" for e in entries) + "}"
        summary = "; ".join(f"{class_of[k]} for layers "
                            f"{_ranges([s.index for s in model.layers if s.block == k])}"
                            for k in layer_kinds)
        opening = '    """The block of layer `layer_idx`: '
        if len(opening + summary) + 1 > LINE:  # wrapped, the docstring's later lines indented
            summary = "\n".join(textwrap.wrap(opening + summary + ".", LINE,
                                               subsequent_indent="    "))[len(opening):-1]
        dispatch = {"table": table, "summary": summary}
    inserted_stacks = []
    inserted_after: dict[int, list] = {}
    for kind in inserted_kinds:
        afters = [i.after for i in model.inserted if i.block == kind]
        attr = f"{kind}_layers"
        inserted_stacks.append({"attr": attr, "class_name": class_of[kind],
                                "after": pyrepr(tuple(afters))})
        for k, after in enumerate(afters):
            inserted_after.setdefault(after, []).append((attr, k))

    cache_shapes = []
    if kv_cache:
        for s in model.layers:
            block = model.blocks[s.block]
            caches = []
            for span in _attention_applications(block):
                att = block.components[_component_at(block, span)]
                caches.append([Code(att.op.cache_class), Code("batch_size"), Code("max_seq_len"),
                               *[cfg.arg(att, k, "self.config", block.name) or att.args[k]
                                 for k in att.op.cache_args],
                               Code("dtype=dtype"), Code("device=device")])
            cache_shapes.append({"layer": s.index, "caches": caches})
    make_caches = _make_caches(cache_shapes, n_layers) if kv_cache else ""
    spine = {}
    for attr, x in (("token_embedding", emb), ("norm", norm), ("output_head", head)):
        func, kwargs = _ctor(x, features, cfg, "config", "model")
        spine[attr] = "\n".join(call_lines(f"self.{attr} = ", func, kwargs, 12)).lstrip()
    tied = head.args.get("tie") is not None
    depth_scaled = model.params.get("init_depth_scaled", True)

    rotary = None
    rope_tables_call = rope_limit = rope_tables_return = rope_original = ""
    if rope_comp is not None:
        rotary = dict(rope_comp.args)
        rotary.pop("_head_dim_derived", None)
        rope_limit = cfg.arg(rope_comp, "max_seq_len", "self.config", "model") \
            or Code(pyrepr(rotary["max_seq_len"]))
        rope_original = cfg.arg(rope_comp, "original_max_seq_len", "self.config", "model") \
            or pyrepr(rotary["original_max_seq_len"])
        rotary["by_length"] = {
            "dynamic": "the NTK base grows with a sequence past original_max_seq_len",
            "longrope": "the long factors past original_max_seq_len",
        }.get(rotary["scaling"], "")
        rope_tables_return = "\n".join(call_lines(
            "return ", rope_comp.op.definitions[0], _rope_table_args(rope_comp, cfg), 4))
        rope_tables_call = "\n".join(call_lines(
            "self.rope_cos, self.rope_sin = ", "rope_tables",
            [rope_limit, "param.device", "self.config"], 8))
    vlm_context = _vlm_context(vlm, vision, features, model, cfg, vcfg) if vlm else None
    module_classes = [_module_class(env, m, features, cfg) for m in modules]
    cfg.read |= {"init_std", "n_layers"} | ({"max_seq_len"} if kv_cache else set())
    # the layer count decides the layers' block classes and the inserted blocks' places
    fixed_layers = not single or bool(inserted_stacks)
    config_fields = _config_fields(model, dim, vocab, n_layers, max_seq_len)
    config_fields += [{"name": k, "type": "int", "value": pyrepr(v)}
                      for k, (v, _) in cfg.computed.items()]
    fixed = sorted({f["name"] for f in config_fields} - cfg.read
                   | ({"n_layers"} if fixed_layers else set())
                   | (vlm_context["text_fixed"] if vlm_context else set()))
    context = {
        "header": header, "name": model.name, "spec": spec, "n_layers": n_layers,
        "params_total": c.params_total, "dim": dim, "vocab": vocab, "max_seq_len": max_seq_len,
        "config_fields": config_fields,
        "computed": pyformat(cfg.computed_from(), 0,
                             len("COMPUTED = ")),
        "fixed": _tuple_literal(fixed) if fixed else "()",
        "rope_tables_call": rope_tables_call, "rope_limit": rope_limit,
        "rope_tables_return": rope_tables_return, "rope_original": rope_original,
        "make_caches": make_caches,
        "cache_type": " | ".join(cache_classes),
        "kv_cache": kv_cache, "rotary": rotary,
        "needs_math": bool(depth_scaled) or any("math." in code for code in op_classes),
        "moe_fqns": [f"{fqn}.{m}" if copies else fqn
                     for fqn in dict.fromkeys(d["fqn"] for _, d in graph.nodes(data=True)
                                              if d.get("op") in OPS
                                              and "experts" in OPS[d["op"]].slots
                                              and not replaced(OPS[d["op"]]))
                     for m in (vlm.fusion.args[hooks.modalities_arg] if copies else [None])],
        "out_std_expr": "std / math.sqrt(2 * self.config.n_layers)" if depth_scaled else "std",
        "out_std_config": "config.init_std / math.sqrt(2 * config.n_layers)" if depth_scaled
        else "config.init_std",
        "rope_call": "\n".join(call_lines(
            "rope_cos, rope_sin = ", "self._rope",
            ["b", "s", "h.device", "padding"]
            + (["doc_ids"] if rotary and rotary["doc_restart"] else [])
            + (["kv_caches"] if kv_cache else []), 8)),
        "op_classes": op_classes, "blocks": blocks, "dispatch": dispatch,
        "inserted_stacks": inserted_stacks,
        "inserted_after": "{" + ", ".join(f"{a}: {pyrepr(tuple(v))}"
                                          for a, v in sorted(inserted_after.items())) + "}",
        "mask_kinds": kinds, "no_windows": not windows, "masks_call": masks_call,
        "document_spans": "document_spans" in features,
        "fused_loss": "fused_loss" in features,
        "no_mask_dict": "{" + ", ".join([f"{pyrepr(k['name'])}: None" for k in kinds]
                                        + (['"padding": None'] if pads else [])) + "}",
        "pads": pads,
        "spine": spine, "tied": tied,
        "non_causal": ", ".join([fqn for fqn, _ in graph.graph.get("non_causal", [])]
                                + ([f"its {vlm.fusion.op.name} fusion"] if vlm and not
                                   vlm.fusion.op.causal(vlm.fusion.args) else [])),
    }
    context["modules"] = module_classes
    # what the templates wire for the fusion (they hold no fusion kind): a prefix of
    # image tokens, a stack of blocks fed the image as memory, routing by modality
    context["fusion"] = {
        "prefix": bool(hooks and hooks.prefixed), "memory": bool(hooks and hooks.stack),
        "stack": hooks.stack if hooks else "", "routed": routed is not None,
        "stack_noun": hooks.stack_noun if hooks else "",
        "routing_doc": hooks.routing_doc if hooks else "",
        "kind": vlm.fusion.op.name if vlm else None,  # the generated VLM.fusion
    }
    context["modalities"] = modalities
    context["vlm"] = vlm_context
    model_py = env.get_template("model.py.j2").render(**context)
    files = {
        "__init__.py": env.get_template("init.py.j2").render(
            header=header, name=package, vlm=bool(vlm),
            caches=sorted(cache_classes) if kv_cache else []),
        "model.py": model_py,
        "plan.py": _plan_py(env, comp, model, graph, header, inserted_stacks, vlm,
                            [f"{fqn}.experts" for fqn in context["moe_fqns"]]),
        "spec.json": json.dumps(_spec_json(comp, model, c, max_seq_len, vlm), indent=2,
                                sort_keys=True) + "\n",
    }
    return files


def _vlm_context(vlm, vision: Model, features: frozenset[str], text_model: Model,
                 cfg: ConfigView, vcfg: ConfigView) -> dict:
    patch = vision.components["patch_embedding"]
    vnorm = vision.components["norm"]
    kinds = [s.block for s in vision.layers]
    classes = {k: f"Vision{_camel(k)}Block" for k in kinds}
    if len(set(kinds)) == 1:
        table = f"{{str(i): {classes[kinds[0]]}(config, i) for i in range(config.n_layers)}}"
        vcfg.read.add("n_layers")
    else:
        table = "{" + ", ".join(f'"{i}": {classes[k]}(config, {i})'
                                for i, k in enumerate(kinds)) + "}"
    layers_ctor = f"self.layers = nn.ModuleDict({table})"
    if len(layers_ctor) + 8 > LINE:
        layers_ctor = f"self.layers = nn.ModuleDict(\n            {table}\n        )"
    func, kwargs = _ctor(patch, features, vcfg, "config", "vision")
    patch_ctor = "\n".join(call_lines("self.patch_embedding = ", func, kwargs, 8)).lstrip()
    func, kwargs = _ctor(vnorm, features, vcfg, "config", "vision")
    norm_ctor = "\n".join(call_lines("self.norm = ", func, kwargs, 8)).lstrip()
    # the adapter reads `TEXT.PARAM` from ModelConfig, `VISION.PARAM` from VisionConfig
    cfg.others = {vlm.text: (cfg, "config"), vlm.vision: (vcfg, "vision_config")}
    func, kwargs = _ctor(vlm.adapter, features, cfg, "config", "adapter")
    cfg.others = {}
    window = vlm.adapter.op.pool_window
    window_code = dict(kwargs).get(window) if window else None
    adapter_ctor = "\n".join(call_lines("self.adapter = ", func, kwargs, 12)).lstrip()
    depth = vision.params.get("init_depth_scaled", True)
    # the image tokens are compiled into the decoder (IMAGE_TOKENS): what decides them is fixed
    image = {k: vcfg.arg(patch, k, "config", "vision") for k in ("channels", "image_size", "patch")}
    image_fields = {name for code in image.values() if code
                    for name in re.findall(r"config\.(\w+)", code)}

    def on_class(key: str):  # a class attribute of VLM: the VisionConfig default
        code = image[key]
        return code.replace("config.", "VisionConfig.") if code and " " not in code \
            else patch.args[key]

    out = {
        "name": vlm.name, "vision_name": vision.name, "image_tokens": vlm.image_tokens,
        "channels": patch.args["channels"], "image_size": patch.args["image_size"],
        "channels_attr": on_class("channels"), "image_size_attr": on_class("image_size"),
        "patch_tokens": patch_tokens(patch.args), "vision_dim": vnorm.args["dim"],
        "vision_layers": len(kinds), "vision_layers_ctor": layers_ctor,
        "patch_ctor": patch_ctor, "vision_norm_ctor": norm_ctor, "adapter_ctor": adapter_ctor,
        "adapter_init": vlm.adapter.op.init_args.replace("out_std", "std"),
        "vision_out_std": "std / math.sqrt(2 * depth)" if depth else "std",
        "vision_depth_scaled": bool(depth),
        "description": vlm.fusion.op.summary.format(image_tokens=vlm.image_tokens),
    }
    if depth:
        vcfg.read.add("n_layers")
    # a pooling window decides IMAGE_TOKENS too: its ModelConfig field is fixed
    out["text_fixed"] = set(re.findall(r"config\.(\w+)", window_code)) \
        if isinstance(window_code, Code) else set()
    rotary = next((c for c in vision.all_components() if "vision_positions" in c.op.slots), None)
    out["vision_rotary"] = None
    if rotary is not None:
        sizes = {k: vcfg.arg(rotary, k, "config", "vision") or Code(pyrepr(rotary.args[k]))
                 for k in ("grid", "head_dim", "theta")}
        call = f"{rotary.op.definitions[0]}({', '.join(sizes.values())}, device=device)"
        out["vision_rotary"] = {**rotary.args, "call": call}
        image_fields |= set(re.findall(r"config\.(\w+)", sizes["grid"]))
    fields = {k: v for k, v in vision.params.items()
              if isinstance(v, bool | int | float | str) and not k.startswith("_")}
    fields.update(dim=vnorm.args["dim"], n_layers=len(kinds))
    config_fields = [{"name": k, "type": _type_name(v), "value": pyrepr(v)} for k, v in fields.items()]
    config_fields += [{"name": k, "type": "int", "value": pyrepr(v)}
                      for k, (v, _) in vcfg.computed.items()]
    fixed = sorted({f["name"] for f in config_fields} - vcfg.read | image_fields
                   | ({"n_layers"} if len(set(kinds)) > 1 else set()))
    out["config_fields"] = config_fields
    out["computed"] = pyformat(vcfg.computed_from(), 0, len("VISION_COMPUTED = "))
    out["fixed"] = _tuple_literal(fixed) if fixed else "()"
    fusion, hooks = vlm.fusion, vlm.fusion.op.fusion
    if hooks.stack:  # its blocks, after the decoder layers it names
        after = hooks.after(fusion.args)
        out["stack_after"] = after
        out["stack_table"] = "{" + ", ".join(f"{a}: {k}" for k, a in enumerate(after)) + "}"
        args = [_inline(_stack_arg(name, fusion, text_model, cfg)) for name in hooks.stack_args]
        func = fusion.op.class_name
        loop = f"for k in range({len(after)})"
        one = f"                {{str(k): {func}({', '.join(args)}) {loop}}}"
        out["stack_ctor"] = one if len(one) <= LINE else "\n".join(
            ["                {", *call_lines("str(k): ", func, args, 20),
             f"                    {loop}", "                }"])
    return out


def _stack_arg(name: str, fusion: Component, text: Model, cfg: ConfigView):
    """A constructor argument of a fusion's stack block, read from ModelConfig: an
    argument of the fusion (the decoder's geometry the vlm binder gave it, a size the
    spec wrote, a derived default), or `COMPONENT.ARG` of the text model."""
    if "." in name:
        comp_name, arg = name.split(".")
        comp = text.components[comp_name]
        return cfg.arg(comp, arg, "config", "model") or comp.args[arg]
    if name in DECODER_ARGS:
        return cfg.field(name, "config")
    rule = fusion.op.derived_code.get(name)
    if rule is not None and name not in fusion.arg_exprs:
        # its derived default: a field of its own, computed from the decoder's
        deps = tuple(sorted(k for k in DECODER_ARGS if "{" + k + "}" in rule))
        cfg.computed[f"fusion_{name}"] = (fusion.args[name], deps)
        return cfg.field(f"fusion_{name}", "config")
    return cfg.arg(fusion, name, "config", "fusion") or fusion.args[name]


def _fusion_ctor(fusion: Component, features: frozenset[str], cfg: ConfigView):
    """A routing fusion's module in place of a block component: its sizes read from
    ModelConfig, its modalities MODALITIES."""
    func, kwargs = _ctor(fusion, features, cfg, "config", "fusion")
    hooks = fusion.op.fusion
    return func, [(k, cfg.field(k, "config") if k in DECODER_ARGS
                   else Code("MODALITIES") if k == hooks.modalities_arg else v)
                  for k, v in kwargs]


def _plan_py(env, comp: Compilation, model: Model, graph, header: str, inserted_stacks,
             vlm, expert_fqns: list[str]) -> str:
    if vlm is not None:
        plans = {name: vlm_plan_data(p, vlm, comp.models, comp.graphs)
                 for name, p in sorted(comp.plans.items()) if p.target == vlm.name}
    else:
        plans = {name: plan_data(p, model, graph) for name, p in sorted(comp.plans.items())
                 if p.target == model.name}
    layer_attrs = ["layers", *[x["attr"] for x in inserted_stacks]]
    # what a pipeline stage may lack (runtime.parallel.build_stage)
    modules = ["token_embedding", "norm", "output_head"]
    stacks = list(layer_attrs)
    if vlm is not None:  # FQNs in the VLM module
        modules = ["vision_encoder.patch_embedding", "vision_encoder.norm", "adapter",
                   *[f"transformer.{m}" for m in modules]]
        stacks = ["vision_encoder.layers", *[f"transformer.{a}" for a in stacks]]
        if vlm.fusion.op.fusion.stack:
            stacks.append(f"transformer.{vlm.fusion.op.fusion.stack}")
    return env.get_template("plan.py.j2").render(
        header=header, name=vlm.name if vlm else model.name, text_model=model.name,
        vlm=vlm is not None, inserted=bool(inserted_stacks), moe=bool(expert_fqns),
        layer_fqns=pyformat(layer_units(model), 0, len("LAYER_FQNS = ")),
        stage_modules=pyformat(modules, 0, len("STAGE_MODULES = ")),
        stage_stacks=pyformat(stacks, 0, len("STAGE_STACKS = ")),
        tp_plan=pyformat(tp_plan(model), 0, len("TP_PLAN = ")),
        expert_fqns=pyformat(expert_fqns, 0, len("EXPERT_FQNS = ")),
        plans=pyformat(plans, 0, len("PLANS = ")),
    )


def _make_caches(cache_shapes: list[dict], n_layers: int) -> str:
    """The return statement of make_kv_caches, formatted as ruff would."""
    def one(cache: list, indent: int, suffix: str = "") -> list[str]:
        return call_lines("", cache[0], [_inline(a) for a in cache[1:]], indent, suffix)

    per_layer = {tuple(tuple(c) for c in s["caches"]) for s in cache_shapes}
    if len(per_layer) == 1 and len(cache_shapes) == n_layers and len(cache_shapes[0]["caches"]) == 1:
        cls, *args = cache_shapes[0]["caches"][0]
        pre = ""
        if cls == "KVCache" and any(isinstance(a, Code) and "." in a for a in args[2:4]):
            # name the sizes
            pre = f"        kv_heads, head_dim = {_inline(args[2])}, {_inline(args[3])}\n"
            args = [*args[:2], Code("kv_heads"), Code("head_dim"), *args[4:]]
        loop = "for _ in range(self.config.n_layers)"
        flat = f"{cls}({', '.join(_inline(a) for a in args)})"
        line = f"        return [{flat} {loop}]"
        if len(line) <= LINE:
            return pre + line
        return pre + "\n".join(["        return [", *one([cls, *args], 12),
                                 f"            {loop}", "        ]"])
    lines = ["        return ["]
    for s in cache_shapes:
        if len(s["caches"]) == 1:
            entry = one(s["caches"][0], 12, ",")
        else:
            entry = ["            ("] + [x for c in s["caches"] for x in one(c, 16, ",")] \
                + ["            ),"]
        entry[-1] += f"  # layer {s['layer']}"
        lines += entry
    return "\n".join(lines + ["        ]"])


def _copies_ctor(cname: str, func: str, kwargs) -> list[str]:
    """`self.c = nn.ModuleDict({m: Op(...) for m in MODALITIES})`, formatted as ruff would."""
    one = call_lines("", func, kwargs, 0)
    if len(one) == 1:
        line = f"        self.{cname} = nn.ModuleDict({{m: {one[0]} for m in MODALITIES}})"
        if len(line) <= LINE:
            return [line]
        inner = f"            {{m: {one[0]} for m in MODALITIES}}"
        if len(inner) <= LINE:
            return [f"        self.{cname} = nn.ModuleDict(", inner, "        )"]
    return [f"        self.{cname} = nn.ModuleDict(", "            {",
            *call_lines("m: ", func, kwargs, 16), "                for m in MODALITIES",
            "            }", "        )"]


# rotary_tables' keyword arguments: the rope argument each reads, and the feature of the
# rope op's modules.py that keeps it (compiler/ops/rope/modules.py)
_ROPE_TABLE_ARGS = (
    ("local_theta", "local_theta", "local_theta"),
    ("factor", "scale_factor", "scale_factor"),
    ("low_freq_factor", "low_freq_factor", "llama3_scaling"),
    ("high_freq_factor", "high_freq_factor", "llama3_scaling"),
    ("original_max_seq_len", "original_max_seq_len", "original_context"),
    ("beta_fast", "beta_fast", "yarn_scaling"),
    ("beta_slow", "beta_slow", "yarn_scaling"),
    ("truncate", "truncate", "yarn_scaling"),
    ("short_factor", "short_factor", "longrope_scaling"),
    ("long_factor", "long_factor", "longrope_scaling"),
    ("attention_factor", "attention_factor", "rope_attention_factor"),
)


def _rope_table_args(rope_comp: Component, cfg: ConfigView) -> list[str]:
    """The arguments of the rope op's table function in rope_tables: sizes from
    ModelConfig where the spec names them, the scaling's settings as literals."""
    a, used = rope_comp.args, rope_comp.op.features(rope_comp.args)

    def value(name: str) -> str:
        return str(cfg.arg(rope_comp, name, "config", "model") or pyrepr(a[name]))

    out = ["positions", value("rotary_dim"), value("theta")]
    out += [f"{kw}={value(name)}" for kw, name, feature in _ROPE_TABLE_ARGS if feature in used]
    if "length_dependent_rope" in used:
        out.append("seq_len=seq_len")
    return out + ["device=device"]


def _max_seq_len(model: Model, rope_comp: Component | None) -> int:
    value = model.params.get("max_seq_len")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if rope_comp is not None:
        return rope_comp.args["max_seq_len"]
    return 2048


def _config_fields(model: Model, dim: int, vocab: int, n_layers: int, max_seq_len: int):
    """ModelConfig: the spec's scalar parameters, plus the fields every runtime reads."""
    fields: dict[str, object] = {}
    for name, value in model.params.items():
        if isinstance(value, bool | int | float | str) and not name.startswith("_"):
            fields[name] = value
    # the runtime's fields come from the model's structure, whatever the spec named them
    fields.update(vocab_size=vocab, dim=dim, n_layers=n_layers, max_seq_len=max_seq_len)
    fields.setdefault("init_std", 0.02)
    return [{"name": name, "type": _type_name(value), "value": pyrepr(value)}
            for name, value in fields.items()]


def _type_name(value) -> str:
    return ("bool" if isinstance(value, bool) else "int" if isinstance(value, int)
            else "float" if isinstance(value, float) else "str")


def _plain_args(args: dict) -> dict:
    from .bind import ComponentValue

    out = {}
    for k, v in sorted(args.items()):
        if k.startswith("_"):
            continue
        out[k] = v.component.name if isinstance(v, ComponentValue) else v
    return out


def _spec_json(comp: Compilation, model: Model, c, max_seq_len: int, vlm=None) -> dict:
    extra = {}
    if vlm is not None:
        extra["vlm"] = {"name": vlm.name, "vision": vlm.vision, "fusion": vlm.fusion.op.name,
                        "image_tokens": vlm.image_tokens,
                        "adapter": {"op": vlm.adapter.op.name,
                                    "args": _plain_args(vlm.adapter.args)},
                        "fusion_args": _plain_args(vlm.fusion.args)}
    return {
        **extra,
        "forgec": FORGEC_VERSION,
        "spec": comp.program.root,
        "source_sha256": source_hash(comp),
        "model": model.name,
        "params": {k: v for k, v in sorted(model.params.items())
                   if isinstance(v, bool | int | float | str)},
        "max_seq_len": max_seq_len,
        "components": {name: {"op": x.op.name, "args": _plain_args(x.args)}
                       for name, x in sorted(model.components.items())},
        "blocks": {name: {"inputs": list(b.inputs),
                          "components": {cn: {"op": x.op.name, "args": _plain_args(x.args)}
                                         for cn, x in sorted(b.components.items())}}
                   for name, b in sorted(model.blocks.items())},
        "layers": [s.block for s in model.layers],
        "inserted": [{"after": i.after, "block": i.block} for i in model.inserted],
        "params_total": c.params_total,
        "params_active": c.params_active,
        "supports_kv_cache": c.supports_kv_cache,
    }
