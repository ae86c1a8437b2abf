"""Lowering: a bound model → a networkx graph of typed ops with inferred shapes.

Full view (`lower`): one node per op application, named by module FQN
(`layers.3.attention`), plus `add`/`scale` nodes for residual arithmetic and
the `tokens` input / `logits` output. Node attributes:

    kind     "input" | "op" | "add" | "scale" | "output"
    op       registry op name (kind "op")
    fqn      module FQN of the component ("" for arithmetic)
    args     resolved op arguments
    weights  {parameter FQN: shape} — on the first application of a module
    tied     {parameter FQN: FQN it shares storage with}
    shape    output shape; ints and the symbols "B", "S"; None if unknown
    span     source location of the application (diagnostics.Span)
    layer    layer index, or None outside the stack
    block    block name, or None

Edges carry `index`, the input position at the consumer. Shapes are inferred
from each op's declared output rule; whether inputs agree with what each op
expects is checked afterwards by compiler/checks/shapes.py, so lowering never
fails on a shape.

`model_view` contracts each layer to one node; `block_view` lowers one block
on its own, with symbolic inputs.
"""

from __future__ import annotations

import networkx as nx

from .bind import Block, Component, FAdd, FApply, Flow, FRef, FScale, Model

TOKENS, LOGITS = "tokens", "logits"
PIXELS, FEATURES = "pixels", "features"  # a vision encoder's input and output


def _shape_ok(shape) -> bool:
    return shape is not None and all(isinstance(d, str) or (isinstance(d, int) and d > 0)
                                      for d in shape)


class _Lowerer:
    def __init__(self, model: Model):
        self.model = model
        self.g = nx.MultiDiGraph()
        self.g.graph.update(name=model.name, file=model.file, model=model)
        self.seen_fqns: set[str] = set()

    def op_node(self, node_id: str, comp: Component, fqn: str, span, inputs: list[str], **attrs):
        shape = comp.op.output(comp.args) if comp.ok else None
        weights: dict = {}
        tied: dict = {}
        if comp.ok and fqn not in self.seen_fqns:
            self.seen_fqns.add(fqn)
            weights = {f"{fqn}.{k}": v for k, v in comp.op.weights(comp.args).items()}
            tie = comp.args.get("tie")
            if tie is not None:
                # the head shares the embedding's table: same storage, one parameter
                target = f"{tie.component.name}.embedding.weight"
                tied = {f"{fqn}.proj.weight": target}
                weights.pop(f"{fqn}.proj.weight", None)
        self.g.add_node(node_id, kind="op", op=comp.op.name, component=comp.name, fqn=fqn, ok=comp.ok,
                        args=comp.args, weights=weights, tied=tied,
                        shape=shape if _shape_ok(shape) else None, span=span,
                        decl_span=comp.span, **attrs)
        for i, src in enumerate(inputs):
            self.g.add_edge(src, node_id, index=i)
        return node_id

    def block(self, block: Block, prefix: str, inputs: dict[str, str], layer: int | None) -> str | None:
        env = dict(inputs)
        counter = {"n": 0}
        applied: dict[str, int] = {}

        def fresh(base: str) -> str:
            counter["n"] += 1
            return f"{prefix}/{base}{counter['n']}" if prefix else f"{base}{counter['n']}"

        def lower_flow(f: Flow) -> str | None:
            if isinstance(f, FRef):
                return env.get(f.name)
            if isinstance(f, FApply):
                args = [lower_flow(a) for a in f.args]
                comp = block.components[f.component]
                fqn = f"{prefix}.{f.component}" if prefix else f.component
                n = applied.get(f.component, 0)
                applied[f.component] = n + 1
                node_id = fqn if n == 0 else f"{fqn}#{n}"
                return self.op_node(node_id, comp, fqn, f.span, [a for a in args if a],
                                    layer=layer, block=block.name, arity=len(args))
            if isinstance(f, FAdd):
                left, right = lower_flow(f.left), lower_flow(f.right)
                node_id = fresh("add")
                lshape = self.g.nodes[left]["shape"] if left else None
                self.g.add_node(node_id, kind="add", fqn="", shape=lshape, span=f.span,
                                layer=layer, block=block.name)
                for i, src in enumerate((left, right)):
                    if src is not None:
                        self.g.add_edge(src, node_id, index=i)
                return node_id
            if isinstance(f, FScale):
                src = lower_flow(f.operand)
                node_id = fresh("scale")
                self.g.add_node(node_id, kind="scale", fqn="", factor=f.factor,
                                shape=self.g.nodes[src]["shape"] if src else None, span=f.span,
                                layer=layer, block=block.name)
                if src is not None:
                    self.g.add_edge(src, node_id, index=0)
                return node_id
            raise AssertionError(f)

        for name, expr, _ in block.flow:
            env[name] = lower_flow(expr)
        if block.ret is None:
            return None
        out = lower_flow(block.ret)
        if out is not None:
            self.g.nodes[out]["block_output"] = True
        return out

    def spine_op(self, name: str, src: str | None) -> str | None:
        comp = self.model.components.get(name)
        if comp is None:
            return None
        return self.op_node(name, comp, name, comp.span, [src] if src else [], layer=None,
                            block=None, arity=1)

    def run(self) -> nx.MultiDiGraph:
        m = self.model
        if m.kind == "vision":
            return self.run_vision()
        self.g.add_node(TOKENS, kind="input", fqn="", shape=("B", "S"), span=m.name_span,
                        layer=None, block=None)
        x = self.spine_op("token_embedding", TOKENS)
        x = self.stack(x)
        x = self.spine_op("norm", x)
        x = self.spine_op("output_head", x)
        return self.output(LOGITS, x)

    def run_vision(self) -> nx.MultiDiGraph:
        """pixels (B, C, H, W) → patch_embedding → layers → norm → features (B, S, dim)."""
        m = self.model
        patch = m.components.get("patch_embedding")
        shape = patch.op.inputs(patch.args)[0] if patch is not None and patch.ok else None
        self.g.add_node(PIXELS, kind="input", fqn="", shape=shape, span=m.name_span,
                        layer=None, block=None)
        x = self.spine_op("patch_embedding", PIXELS)
        x = self.stack(x)
        x = self.spine_op("norm", x)
        return self.output(FEATURES, x)

    def output(self, name: str, x: str | None) -> nx.MultiDiGraph:
        self.g.add_node(name, kind="output", fqn="", span=self.model.name_span, layer=None,
                        block=None, shape=self.g.nodes[x]["shape"] if x else None)
        if x is not None:
            self.g.add_edge(x, name, index=0)
        return self.g

    def stack(self, x: str | None) -> str | None:
        m = self.model
        after: dict[int, list] = {}
        for ins in m.inserted:
            after.setdefault(ins.after, []).append(ins)
        ordinal: dict[str, int] = {}
        for slot in m.layers:
            block = m.blocks[slot.block]
            x = self.block(block, f"layers.{slot.index}", {block.inputs[0]: x}, slot.index)
            for ins in after.get(slot.index, []):
                k = ordinal.get(ins.block, 0)
                ordinal[ins.block] = k + 1
                extra = m.blocks[ins.block]
                x = self.block(extra, f"{ins.block}_layers.{k}", {extra.inputs[0]: x}, slot.index)
        return x


def lower(model: Model) -> nx.MultiDiGraph:
    return _Lowerer(model).run()


def block_view(model: Model, block_name: str) -> nx.MultiDiGraph:
    """One block on its own: its inputs become `input` nodes."""
    low = _Lowerer(model)
    block = model.blocks[block_name]
    inputs = {}
    for name in block.inputs:
        low.g.add_node(name, kind="input", fqn="", shape=None, span=block.name_span,
                       layer=None, block=block_name)
        inputs[name] = name
    out = low.block(block, "", inputs, None)
    low.g.add_node("return", kind="output", fqn="", shape=None, span=block.ret_span or block.span,
                   layer=None, block=block_name)
    if out is not None:
        low.g.add_edge(out, "return", index=0)
    return low.g


def model_view(g: nx.MultiDiGraph) -> nx.DiGraph:
    """Each layer (and inserted block) contracted to one node."""
    group: dict[str, str] = {}
    view = nx.DiGraph(name=g.graph["name"])
    for n, data in g.nodes(data=True):
        if data.get("layer") is not None:
            fqn = data["fqn"] or n
            gid = ".".join(fqn.split("/")[0].split(".")[:2])
            group[n] = gid
            if gid not in view:
                view.add_node(gid, kind="block", block=data["block"], layer=data["layer"])
        else:
            group[n] = n
            view.add_node(n, **{k: v for k, v in data.items() if k in ("kind", "op", "shape")})
    for u, v in g.edges():
        gu, gv = group[u], group[v]
        if gu != gv:
            view.add_edge(gu, gv)
    last_output: dict[str, str] = {}  # group → its last block output (one pass, not n²)
    for n, data in g.nodes(data=True):
        if data.get("block_output"):
            last_output[group[n]] = n
    for gid in view.nodes:
        if view.nodes[gid].get("kind") == "block":
            out = last_output.get(gid)
            view.nodes[gid]["shape"] = g.nodes[out]["shape"] if out else None
    return view
