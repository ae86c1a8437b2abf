"""Graph output for `forgec graph`: DOT text, JSON, and SVG through Graphviz."""

from __future__ import annotations

import json
import shutil
import subprocess

import networkx as nx

from .bind import ComponentValue


def _plain(value):
    """Graph attribute → JSON-safe value."""
    if isinstance(value, ComponentValue):
        return value.component.name
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def in_dataflow_order(graph: nx.Graph) -> nx.Graph:
    """The same graph with its nodes (and their out-edges) listed producers first, ties
    in the order they were made: what lowering spliced into a VLM's graph (the fusion,
    cross-attention blocks) then reads in its place."""
    made = {n: i for i, n in enumerate(graph.nodes)}
    order = list(nx.lexicographical_topological_sort(graph, key=made.__getitem__))
    out = graph.__class__()
    out.graph.update(graph.graph)
    out.add_nodes_from((n, graph.nodes[n]) for n in order)
    out.add_edges_from((u, v, d) for n in order for u, v, d in graph.out_edges(n, data=True))
    return out


_NODE_KEYS = ("kind", "op", "fqn", "component", "block", "layer", "shape", "args", "weights",
              "tied", "factor", "block_output", "part", "fusion", "after", "drop")


def to_json(graph: nx.Graph, view: str) -> str:
    nodes = []
    for n, data in graph.nodes(data=True):
        node = {"id": n}
        node.update({k: _plain(data[k]) for k in _NODE_KEYS if k in data})
        if "span" in data and data["span"] is not None:
            node["source"] = str(data["span"])
        nodes.append(node)
    edges = [{"source": u, "target": v, **{k: d[k] for k in ("index", "modality") if k in d}}
             for u, v, d in graph.edges(data=True)]
    doc = {"model": graph.graph.get("name"), "view": view, "nodes": nodes, "edges": edges}
    return json.dumps(doc, indent=2) + "\n"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if shape else "?"


_STYLE = {
    "input": 'shape=oval, style=filled, fillcolor="#e8f0fe"',
    "output": 'shape=oval, style=filled, fillcolor="#e8f0fe"',
    "op": 'shape=box, style="rounded,filled", fillcolor="#fff4e0"',
    "block": 'shape=box3d, style=filled, fillcolor="#f0f0f0"',
    "add": 'shape=circle, label="+", width=0.3, fixedsize=true',
    "scale": "shape=circle, width=0.3, fixedsize=true",
    "slice": 'shape=box, style="dashed"',
}

# a VLM's edges, by what flows along them (compiler/lower.py, `lower_vlm`); text is plain
_EDGE_STYLE = {
    "image": 'color="#1a73e8"',
    "image+text": 'color="#9334e6"',
    "memory": 'color="#1a73e8", style=dashed, label="memory", fontsize=8',
}


def to_dot(graph: nx.Graph, view: str) -> str:
    name = graph.graph.get("name", "model")
    lines = [f"digraph {_quote(f'{name} ({view})')} {{", "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=10];']
    ids = {n: f"n{i}" for i, n in enumerate(graph.nodes)}
    for n, data in graph.nodes(data=True):
        kind = data.get("kind", "op")
        style = _STYLE.get(kind, "shape=box")
        if kind in ("add",):
            label = None
        elif kind == "scale":
            label = f"×{data.get('factor', 1.0):g}"
        elif kind == "block":
            block = data.get("block") + (f" [{data['fusion']}]" if "fusion" in data else "")
            label = f"{n}\n{block}\n{_shape(data.get('shape'))}"
        elif kind == "op":
            op = data.get("op") + (f" [{data['fusion']}]" if "fusion" in data else "")
            label = f"{data.get('fqn') or n}\n{op}\n{_shape(data.get('shape'))}"
        elif kind == "slice":
            label = (f"{n}\ndrop {data.get('drop')} image positions\n"
                     f"{_shape(data.get('shape'))}")
        else:
            label = f"{n}\n{_shape(data.get('shape'))}"
        attrs = style + (f", label={_quote(label)}" if label is not None else "")
        lines.append(f"  {ids[n]} [{attrs}];")
    for u, v, data in graph.edges(data=True):
        style = _EDGE_STYLE.get(data.get("modality"))
        lines.append(f"  {ids[u]} -> {ids[v]}" + (f" [{style}]" if style else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_available() -> bool:
    return shutil.which("dot") is not None


def to_svg(dot_text: str) -> str:
    result = subprocess.run(["dot", "-Tsvg"], input=dot_text, capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout
