"""E051/E052/E055/E057/E058: tensor shapes agree at every op input, residual add
and element-wise product or difference.

Every op declares the shapes it expects (compiler/ops.py); lowering inferred
each node's output. Here they are compared edge by edge. Blocks in a stack
must also return the shape they receive, so that layers compose.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics
from ..ops import OPS

STRUCTURAL = True


def show(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _inputs(graph: nx.MultiDiGraph, node: str) -> list[tuple[int, str]]:
    return sorted((data["index"], src) for src, _, data in graph.in_edges(node, data=True))


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    hidden = graph.nodes["token_embedding"]["shape"] if "token_embedding" in graph else None
    for node, data in graph.nodes(data=True):
        kind = data["kind"]
        if kind == "op":
            args = data["args"]
            op = OPS[data["op"]]
            if not data["ok"]:
                continue
            expected = op.inputs(args)
            arity = data.get("arity", len(expected))
            if arity != len(expected):
                diags.error("E057", f"'{data['component']}' ({op.name}) takes {len(expected)} "
                            f"input{'s' if len(expected) != 1 else ''}, got {arity}", data["span"])
                continue
            for index, src in _inputs(graph, node):
                got, want = graph.nodes[src]["shape"], expected[index]
                if got is None or want is None or any(
                        isinstance(d, int) and d <= 0 for d in want):
                    continue
                if tuple(got) != tuple(want):
                    diags.error("E052", f"'{data['component']}' ({op.name}) expects "
                                f"{show(want)} but receives {show(got)}", data["span"],
                                notes=[(f"{data['component']} declared here", data["decl_span"])])
        elif kind == "add":
            shapes = [graph.nodes[src]["shape"] for _, src in _inputs(graph, node)]
            if len(shapes) == 2 and None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
                diags.error("E051", f"cannot add {show(shapes[0])} and {show(shapes[1])}",
                            data["span"])
        elif kind in ("mul", "sub"):
            shapes = [graph.nodes[src]["shape"] for _, src in _inputs(graph, node)]
            if len(shapes) == 2 and None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
                verb = "multiply" if kind == "mul" else "subtract"
                diags.error("E055", f"cannot {verb} {show(shapes[0])} and {show(shapes[1])} "
                            "element-wise", data["span"],
                            hint="both operands of an element-wise '*' or '-' have one shape")
        if data.get("block_output") and data.get("layer") is not None and hidden and \
                data["shape"] is not None and tuple(data["shape"]) != tuple(hidden):
            diags.error("E058", f"block '{data['block']}' returns {show(data['shape'])} but a "
                        f"stacked block must return the hidden shape {show(hidden)}", data["span"])
