"""Lowering: a bound model → a networkx graph of typed ops with inferred shapes.

Full view (`lower`): one node per op application, named by module FQN
(`layers.3.attention`), plus `add`/`scale` nodes for residual arithmetic and
the `tokens` input / `logits` output. Node attributes:

    kind     "input" | "op" | "add" | "scale" | "mul" | "sub" | "act" | "output"
    op       registry op name (kind "op")
    fqn      module FQN of the component ("" for arithmetic)
    args     resolved op arguments
    weights  {parameter FQN: shape} — on the first application of a module
    tied     {parameter FQN: FQN it shares storage with}
    shape    output shape; ints and the symbols "B", "S"; None if unknown
    span     source location of the application (diagnostics.Span)
    layer    layer index, or None outside the stack
    block    block name, or None

`mul`/`sub` are element-wise products and differences of two tensors, `act` an
element-wise function (`fn`, its compile-time `fn_args`). A component that is one
of the model's modules is lowered inline: its body's nodes, their FQNs under the
component's (`layers.3.mlp.gate`), in the layer's group.

Edges carry `index`, the input position at the consumer. Shapes are inferred
from each op's declared output rule; whether inputs agree with what each op
expects is checked afterwards by compiler/checks/shapes.py, so lowering never
fails on a shape.

`model_view` contracts each layer to one node; `block_view` lowers one block
on its own, its inputs of the hidden shape. `lower_vlm` joins a vision
encoder's graph, an adapter, a fusion and a text model's graph into the one
graph of a vision-language model, its edges typed by modality.
"""

from __future__ import annotations

import networkx as nx

from .bind import Block, Component, FAct, FAdd, FApply, Flow, FMul, FRef, FScale, FSub, Model
from .ops import OPS, patch_tokens
from .vlm import VLM

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

    def block(self, block: Block, prefix: str, inputs: dict[str, str], layer: int | None,
              *, ids: str | None = None, group: str | None = None,
              in_block: str | None = None) -> str | None:
        """Lower a block's dataflow under `prefix`; for a module inlined in a block,
        `ids` prefixes its node ids (a repeated application's), `group` and
        `in_block` are the enclosing block's, and its output is no block output."""
        env = dict(inputs)
        module = in_block is not None
        ids = prefix if ids is None else ids
        group = group if module else prefix or None  # the unit `model_view` contracts
        block_name = in_block if module else block.name
        counter = {"n": 0}
        applied: dict[str, int] = {}

        def fresh(base: str) -> str:
            counter["n"] += 1
            return f"{ids}/{base}{counter['n']}" if ids else f"{base}{counter['n']}"

        def lower_flow(f: Flow) -> str | None:
            if isinstance(f, FRef):
                return env.get(f.name)
            if isinstance(f, FApply):
                args = [lower_flow(a) for a in f.args]
                comp = block.components[f.component]
                fqn = f"{prefix}.{f.component}" if prefix else f.component
                n = applied.get(f.component, 0)
                applied[f.component] = n + 1
                node_base = f"{ids}.{f.component}" if ids else f.component
                node_id = node_base if n == 0 else f"{node_base}#{n}"
                if comp.module is not None:  # the model's own module: its body, inline
                    if not comp.ok or None in args:
                        return None
                    return self.block(comp.module, fqn, dict(zip(comp.module.inputs, args,
                                                                  strict=True)),
                                      layer, ids=node_id, group=group, in_block=block_name)
                return self.op_node(node_id, comp, fqn, f.span, [a for a in args if a],
                                    layer=layer, block=block_name, group=group,
                                    arity=len(args))
            if isinstance(f, FAdd):
                left, right = lower_flow(f.left), lower_flow(f.right)
                node_id = fresh("add")
                lshape = self.g.nodes[left]["shape"] if left else None
                self.g.add_node(node_id, kind="add", fqn="", shape=lshape, span=f.span,
                                layer=layer, block=block_name, group=group)
                for i, src in enumerate((left, right)):
                    if src is not None:
                        self.g.add_edge(src, node_id, index=i)
                return node_id
            if isinstance(f, FScale):
                src = lower_flow(f.operand)
                node_id = fresh("scale")
                self.g.add_node(node_id, kind="scale", fqn="", factor=f.factor,
                                shape=self.g.nodes[src]["shape"] if src else None, span=f.span,
                                layer=layer, block=block_name, group=group)
                if src is not None:
                    self.g.add_edge(src, node_id, index=0)
                return node_id
            if isinstance(f, FMul | FSub):  # element-wise, checked by checks/shapes.py
                kind = "mul" if isinstance(f, FMul) else "sub"
                left, right = lower_flow(f.left), lower_flow(f.right)
                node_id = fresh(kind)
                self.g.add_node(node_id, kind=kind, fqn="", span=f.span, layer=layer,
                                block=block_name, group=group,
                                shape=self.g.nodes[left]["shape"] if left else None)
                for i, src in enumerate((left, right)):
                    if src is not None:
                        self.g.add_edge(src, node_id, index=i)
                return node_id
            if isinstance(f, FAct):
                src = lower_flow(f.operand)
                node_id = fresh(f.name)
                self.g.add_node(node_id, kind="act", fqn="", fn=f.name, fn_args=f.args,
                                shape=self.g.nodes[src]["shape"] if src else None, span=f.span,
                                layer=layer, block=block_name, group=group)
                if src is not None:
                    self.g.add_edge(src, node_id, index=0)
                return node_id
            raise AssertionError(f)

        for name, expr, _ in block.flow:
            env[name] = lower_flow(expr)
        if block.ret is None:
            return None
        out = lower_flow(block.ret)
        if out is not None and not module:
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
    """One block on its own: its inputs become `input` nodes of the hidden shape a
    stacked block receives (what its model's embedding gives)."""
    low = _Lowerer(model)
    block = model.blocks[block_name]
    embed = model.components.get("patch_embedding" if model.kind == "vision" else
                                 "token_embedding")
    hidden = embed.op.output(embed.args) if embed is not None and embed.ok else None
    inputs = {}
    for name in block.inputs:
        low.g.add_node(name, kind="input", fqn="", shape=hidden if _shape_ok(hidden) else None,
                       span=block.name_span, layer=None, block=block_name)
        inputs[name] = name
    out = low.block(block, "", inputs, None)
    low.g.add_node("return", kind="output", fqn="", span=block.ret_span or block.span,
                   shape=low.g.nodes[out]["shape"] if out is not None else None,
                   layer=None, block=block_name)
    if out is not None:
        low.g.add_edge(out, "return", index=0)
    return low.g


def model_view(g: nx.MultiDiGraph) -> nx.DiGraph:
    """Each layer (and inserted block) contracted to one node; edges keep their modality."""
    group: dict[str, str] = {}
    view = nx.DiGraph(name=g.graph["name"])
    for n, data in g.nodes(data=True):
        if data.get("layer") is not None:
            gid = data["group"]
            group[n] = gid
            if gid not in view:
                view.add_node(gid, kind="block", block=data["block"], layer=data["layer"],
                              **({"part": data["part"]} if "part" in data else {}))
            if "fusion" in data:
                view.nodes[gid]["fusion"] = data["fusion"]
        else:
            group[n] = n
            view.add_node(n, **{k: v for k, v in data.items() if k in _VIEW_KEYS})
    for u, v, data in g.edges(data=True):
        gu, gv = group[u], group[v]
        if gu != gv:
            view.add_edge(gu, gv, **({"modality": data["modality"]} if "modality" in data else {}))
    last_output: dict[str, str] = {}  # group → its last block output (one pass, not n²)
    for n, data in g.nodes(data=True):
        if data.get("block_output"):
            last_output[group[n]] = n
    for gid in view.nodes:
        if view.nodes[gid].get("kind") == "block":
            out = last_output.get(gid)
            view.nodes[gid]["shape"] = g.nodes[out]["shape"] if out else None
    return view


_VIEW_KEYS = ("kind", "op", "shape", "part", "fusion", "drop")


# ---- a vision-language model as one graph -------------------------------------------------

IMAGE = "pixel_values"  # a VLM's inputs, named as its generated forward() names them
VISION_PREFIX, TEXT_PREFIX = "vision_encoder", "transformer"  # parameter FQN prefixes
ADAPTER, FUSION, OUTPUT_SLICE = "adapter", "fusion", "output_slice"


def _with_seq(shape, seq):
    return tuple(seq if d == "S" else d for d in shape) if shape is not None else None


def _copy_into(g: nx.MultiDiGraph, sub: nx.MultiDiGraph, prefix: str, seq, modality: str,
               rename: dict[str, str]) -> dict[str, str]:
    """Copy a model's graph into `g` under `prefix` (node ids, FQNs, parameter names),
    its sequence symbol `S` replaced by `seq`; `rename` maps the ends (inputs,
    outputs) to their names in `g`, or to None to leave them out. Returns the
    old → new node ids."""
    ids = {n: rename.get(n, f"{prefix}.{n}") for n in sub.nodes}

    def named(key: str) -> str:
        return f"{prefix}.{key}"

    def node(data: dict) -> dict:
        if data["kind"] in ("input", "output"):
            return data
        node = {**data, "part": prefix, "shape": _with_seq(data["shape"], seq)}
        if data.get("fqn"):
            node["fqn"] = named(data["fqn"])
        if data.get("group"):
            node["group"] = named(data["group"])
        if "weights" in data:
            node["weights"] = {named(k): v for k, v in data["weights"].items()}
            node["tied"] = {named(k): named(v) for k, v in data["tied"].items()}
        return node

    g.add_nodes_from((ids[n], node(data)) for n, data in sub.nodes(data=True)
                     if ids[n] is not None)
    g.add_edges_from((ids[u], ids[v], {"index": data["index"], "modality": modality})
                     for u, v, data in sub.edges(data=True)
                     if ids[u] is not None and ids[v] is not None)
    return ids


def _reroute(g: nx.MultiDiGraph, src: str, via: str, modality: str) -> None:
    """What `src` fed now comes from `via` (carrying `modality`)."""
    for _, dst, key, data in list(g.out_edges(src, keys=True, data=True)):
        if dst != via:
            g.remove_edge(src, dst, key)
            g.add_edge(via, dst, index=data["index"], modality=modality)


def lower_vlm(vlm: VLM, text: nx.MultiDiGraph, vision: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """A vision-language model as one graph, from the lowered graphs of its parts.

    pixel_values (B, C, H, W) → vision_encoder.* → adapter → image tokens, and
    tokens (B, S) → transformer.token_embedding → text tokens, meet at the
    fusion, as its hooks (`OpDef.fusion`) say: a prefixing fusion (joint decoder,
    MoT, MoMa) prefixes the image tokens to the text (a `fusion` node; the decoder
    runs over image + text positions and `output_slice` drops the image positions
    from the logits); a fusion with a stack of blocks (cross-attention) feeds the
    image tokens as memory into a block after the layers it names.
    Every edge carries `modality`: "image", "text", "image+text" (one sequence
    of both) or "memory" (cross-attention keys and values). The decoder nodes a
    routing fusion chooses per modality are marked `fusion=<its op>` (MoT: every
    block op, a copy per modality; MoMa: the MLPs it replaces). Node shapes are
    concrete where the VLM fixes them (the encoder's patch tokens, the image
    tokens); `S` is the text length.
    """
    text_model, vision_model = text.graph["model"], vision.graph["model"]
    g = nx.MultiDiGraph()
    g.graph.update(name=vlm.name, file=vlm.file, vlm=vlm, text=text_model, vision=vision_model)
    patch = vision_model.components["patch_embedding"].args
    vids = _copy_into(g, vision, VISION_PREFIX, patch_tokens(patch), "image",
                      {PIXELS: IMAGE, FEATURES: None})
    encoded = vids[producer(vision, FEATURES)]

    adapter, tokens = vlm.adapter, vlm.image_tokens
    g.add_node(ADAPTER, kind="op", op=adapter.op.name, component=ADAPTER, fqn=ADAPTER,
               ok=adapter.ok, args=adapter.args,
               weights={f"{ADAPTER}.{k}": v for k, v in adapter.op.weights(adapter.args).items()},
               tied={}, shape=_with_seq(adapter.op.output(adapter.args), tokens),
               span=adapter.span, decl_span=adapter.span, layer=None, block=None, arity=1,
               part=ADAPTER)
    g.add_edge(encoded, ADAPTER, index=0, modality="image")

    fusion = vlm.fusion
    name, hooks = fusion.op.name, fusion.op.fusion
    prefixed = hooks.prefixed
    seq = f"{tokens}+S" if prefixed else "S"
    tids = _copy_into(g, text, TEXT_PREFIX, seq, "image+text" if prefixed else "text",
                      {TOKENS: TOKENS, LOGITS: LOGITS})
    embed = tids["token_embedding"]
    g.nodes[embed]["shape"] = _with_seq(text.nodes["token_embedding"]["shape"], "S")
    for _, _, data in g.out_edges(TOKENS, data=True):
        data["modality"] = "text"
    common = dict(kind="op", component=FUSION, ok=fusion.ok, args=fusion.args, tied={},
                  span=fusion.span, decl_span=fusion.span, layer=None, block=None, part=FUSION)
    if prefixed:
        g.add_node(FUSION, op=name, fqn="", weights={}, arity=2,
                   shape=g.nodes[embed]["shape"][:1] + (seq,) + g.nodes[embed]["shape"][2:],
                   **common)
        _reroute(g, embed, FUSION, "image+text")
        g.add_edge(ADAPTER, FUSION, index=0, modality="image")
        g.add_edge(embed, FUSION, index=1, modality="text")
        head = producer(g, LOGITS)
        g.remove_edge(head, LOGITS)  # the one edge between them
        g.add_node(OUTPUT_SLICE, kind="slice", fqn="", drop=tokens, span=fusion.span,
                   layer=None, block=None, part=FUSION, shape=g.nodes[LOGITS]["shape"])
        g.add_edge(head, OUTPUT_SLICE, index=0, modality="image+text")
        g.add_edge(OUTPUT_SLICE, LOGITS, index=0, modality="text")
        if hooks.routes:  # MoT copies each block op per modality, MoMa replaces its MLPs
            for data in g.nodes.values():
                if data.get("part") != TEXT_PREFIX or data["layer"] is None or \
                        data["kind"] != "op" or not _routed(hooks.routes, data["op"]):
                    continue
                data["fusion"] = name
                fqn, own = data["fqn"], data["weights"]
                if not own:
                    continue  # a repeated application: its weights sit on the first
                if hooks.routes == "block":  # a copy per modality
                    data["weights"] = {f"{fqn}.{m}{w[len(fqn):]}": shape
                                       for m in fusion.args[hooks.modalities_arg]
                                       for w, shape in own.items()}
                else:  # the fusion's own module, one layer's weights ("KIND.…")
                    data["weights"] = {f"{fqn}{w[len(name):]}": shape
                                       for w, shape in fusion.op.weights(fusion.args).items()}
    if hooks.stack:
        ends = {}  # decoder layer → its block's output
        for n, data in g.nodes(data=True):
            if data.get("block_output") and data.get("part") == TEXT_PREFIX and \
                    data["group"] == f"{TEXT_PREFIX}.layers.{data['layer']}":
                ends[data["layer"]] = n
        weights = fusion.op.weights(fusion.args)
        for k, layer in enumerate(hooks.after(fusion.args)):
            fqn = f"{TEXT_PREFIX}.{hooks.stack}.{k}"
            own = f"{hooks.stack}.{k}."
            g.add_node(fqn, op=name, fqn=fqn, arity=2, shape=g.nodes[ends[layer]]["shape"],
                       weights={f"{TEXT_PREFIX}.{w}": s for w, s in weights.items()
                                if w.startswith(own)}, after=layer, **common)
            _reroute(g, ends[layer], fqn, "text")
            g.add_edge(ends[layer], fqn, index=0, modality="text")
            g.add_edge(ADAPTER, fqn, index=1, modality="memory")
    return g


def _routed(routes: str, op: str) -> bool:
    """Whether a routing fusion chooses a decoder op per modality: every op ("block"),
    or those filling the slot it routes."""
    return routes == "block" or routes in OPS[op].slots


def producer(g: nx.MultiDiGraph, node: str) -> str:
    """The node feeding `node`'s first input."""
    return next(src for src, _, d in g.in_edges(node, data=True) if d["index"] == 0)
