"""Graph output for `forgec graph`: DOT text, JSON, and SVG.

The SVG is drawn here, without Graphviz: a layered layout of the graph (rows by
longest path, long edges routed through placeholder points, rows ordered by the
barycenter of their neighbours) drawn with matplotlib, which measures the labels.
"""

from __future__ import annotations

import io
import json
import math

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
    "mul": "shape=circle, width=0.3, fixedsize=true",
    "sub": "shape=circle, width=0.3, fixedsize=true",
    "act": 'shape=box, style="rounded"',
    "slice": 'shape=box, style="dashed"',
}

# a VLM's edges, by what flows along them (compiler/lower.py, `lower_vlm`); text is plain
_EDGE_STYLE = {
    "image": 'color="#1a73e8"',
    "image+text": 'color="#9334e6"',
    "memory": 'color="#1a73e8", style=dashed, label="memory", fontsize=8',
}


def _label(n, data) -> str | None:
    """The text shown in a node; None for a bare residual `+`."""
    kind = data.get("kind", "op")
    fusion = f" [{data['fusion']}]" if "fusion" in data else ""
    if kind == "add":
        return None
    if kind == "scale":
        return f"×{data.get('factor', 1.0):g}"
    if kind in ("mul", "sub"):
        return "×" if kind == "mul" else "−"
    if kind == "act":
        return data.get("fn")
    if kind == "block":
        return f"{n}\n{data.get('block')}{fusion}\n{_shape(data.get('shape'))}"
    if kind == "op":
        return f"{data.get('fqn') or n}\n{data.get('op')}{fusion}\n{_shape(data.get('shape'))}"
    if kind == "slice":
        return f"{n}\ndrop {data.get('drop')} image positions\n{_shape(data.get('shape'))}"
    return f"{n}\n{_shape(data.get('shape'))}"


def to_dot(graph: nx.Graph, view: str) -> str:
    name = graph.graph.get("name", "model")
    lines = [f"digraph {_quote(f'{name} ({view})')} {{", "  rankdir=TB;",
             '  node [fontname="Helvetica", fontsize=10];']
    ids = {n: f"n{i}" for i, n in enumerate(graph.nodes)}
    for n, data in graph.nodes(data=True):
        style = _STYLE.get(data.get("kind", "op"), "shape=box")
        label = _label(n, data)
        attrs = style + (f", label={_quote(label)}" if label is not None else "")
        lines.append(f"  {ids[n]} [{attrs}];")
    for u, v, data in graph.edges(data=True):
        style = _EDGE_STYLE.get(data.get("modality"))
        lines.append(f"  {ids[u]} -> {ids[v]}" + (f" [{style}]" if style else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- SVG ---------------------------------------------------------------------------------------
# Lengths are in inches: the figure is as large as the layout, one data unit per inch.

_FONT_SIZE = 9
_PAD_X, _PAD_Y = 0.10, 0.06     # label to box edge
_GAP_X, _GAP_Y = 0.25, 0.35     # between boxes in a row; between rows
_MARGIN = 0.25
_CIRCLE = 0.28                  # smallest diameter of `+` and scale nodes
_ROUTE = 0.12                   # width reserved for an edge passing through a row
_TITLE = 0.35                   # height of the title line
_FILL = {"input": "#e8f0fe", "output": "#e8f0fe", "op": "#fff4e0", "block": "#f0f0f0",
         "add": "#ffffff", "scale": "#ffffff", "mul": "#ffffff", "sub": "#ffffff",
         "act": "#ffffff"}
_SWEEPS = 4                     # barycenter passes (down and up) ordering the rows
_EDGE = ("#555555", "-")        # colour and line style of an edge; a VLM's, by what flows:
_EDGE_BY_MODALITY = {"image": ("#1a73e8", "-"), "image+text": ("#9334e6", "-"),
                     "memory": ("#1a73e8", "--")}
_DASHED = ("slice",)            # outlined dashed (a VLM's image positions dropped)


def _rows(graph: nx.Graph) -> dict:
    """Row of each node: the longest path from a source (strongly connected nodes share
    one), with each source moved down to just above its first consumer."""
    dag = nx.condensation(graph)
    member = dag.graph["mapping"]
    rank: dict[int, int] = {}
    for c in nx.topological_sort(dag):
        rank[c] = max((rank[p] + 1 for p in dag.predecessors(c)), default=0)
    for c in dag.nodes:
        if dag.in_degree(c) == 0 and dag.out_degree(c) > 0:
            rank[c] = min(rank[s] for s in dag.successors(c)) - 1
    return {n: rank[member[n]] for n in graph.nodes}


_ROUND = ("add", "scale", "mul", "sub")  # drawn as circles


def _text_size(figure, renderer, text: str, size: float) -> tuple[float, float]:
    """(width, height) in inches of `text` as matplotlib lays it out."""
    artist = figure.text(0, 0, text, fontsize=size, parse_math=False)
    box = artist.get_window_extent(renderer)
    artist.remove()
    return box.width / figure.dpi, box.height / figure.dpi


def _measure(graph: nx.Graph, labels: dict, figure, renderer) -> dict:
    """(width, height) in inches of each node's box (or circle)."""
    sizes = {}
    for n, kind in graph.nodes(data="kind", default="op"):
        label = labels[n]
        if label is None:
            sizes[n] = (_CIRCLE, _CIRCLE)
        elif kind in _ROUND:
            w, h = _text_size(figure, renderer, label, _FONT_SIZE - 2)
            d = max(_CIRCLE, w + 2 * _PAD_Y, h + 2 * _PAD_Y)
            sizes[n] = (d, d)
        else:
            w, h = _text_size(figure, renderer, label, _FONT_SIZE)
            sizes[n] = (w + 2 * _PAD_X, h + 2 * _PAD_Y)
    return sizes


def _layout(graph: nx.Graph, sizes: dict, title_width: float):
    """Positions (box centres) of nodes and edge routes, and the drawing's size."""
    row_of = _rows(graph)
    n_rows = max(row_of.values(), default=-1) + 1
    rows: list[list] = [[] for _ in range(n_rows)]
    for n in graph.nodes:
        rows[row_of[n]].append(n)
    # An edge spanning k rows passes through k - 1 placeholder points, one per row between.
    ups: dict = {n: [] for n in graph.nodes}     # neighbours in the row above
    downs: dict = {n: [] for n in graph.nodes}   # neighbours in the row below
    routes = []
    for i, (u, v) in enumerate(graph.edges()):
        route = [u]
        if row_of[v] > row_of[u]:
            for r in range(row_of[u] + 1, row_of[v]):
                point = ("route", i, r)
                rows[r].append(point)
                ups[point], downs[point] = [], []
                sizes[point] = (_ROUTE, 0.0)
                route.append(point)
            route.append(v)
            for a, b in zip(route, route[1:], strict=False):
                downs[a].append(b)
                ups[b].append(a)
        else:  # within a cycle: drawn straight, not used for ordering
            route.append(v)
        routes.append(route)

    def order(rank_rows, neighbours):
        for r in range(1, len(rank_rows)):
            index = {n: i for i, n in enumerate(rank_rows[r - 1])}
            row = rank_rows[r]

            def key(item, index=index):
                i, n = item
                near = [index[m] for m in neighbours[n] if m in index]
                return sum(near) / len(near) if near else i

            row[:] = [n for _, n in sorted(enumerate(row), key=key)]

    for _ in range(_SWEEPS):
        order(rows, ups)
        order(rows[::-1], downs)
    order(rows, ups)

    # x: each node under the mean of its neighbours above (nodes before routes, so that
    # chains stay straight), pushed right past its left neighbour.
    x: dict = {}
    for row in rows:
        right = None
        for n in row:
            half = sizes[n][0] / 2
            above = ([x[m] for m in ups[n] if m in x and m in graph]
                     or [x[m] for m in ups[n] if m in x])
            want = sum(above) / len(above) if above else (right or 0.0) + half
            if right is not None:
                want = max(want, right + _GAP_X + half)
            x[n] = want
            right = want + half
    left = min((x[n] - sizes[n][0] / 2 for n in x), default=0.0)
    width = max((x[n] + sizes[n][0] / 2 for n in x), default=0.0) - left + 2 * _MARGIN
    width = max(width, title_width + 2 * _MARGIN)
    y: dict = {}
    top = _MARGIN + _TITLE
    for row in rows:
        height = max((sizes[n][1] for n in row), default=0.0)
        for n in row:
            x[n] += _MARGIN - left
            y[n] = top + height / 2
            if n not in graph:  # a route runs straight down through its row
                sizes[n] = (_ROUTE, height)
        top += height + _GAP_Y
    height = top - _GAP_Y + _MARGIN
    return x, y, routes, width, height


def to_svg(graph: nx.Graph, view: str) -> str:
    """The graph drawn as SVG; the same graph gives the same bytes."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path

    # Fixed ids and no date make the bytes reproducible; text stays text (searchable, small),
    # measured in the font matplotlib ships, so every machine lays it out alike.
    rc = {"svg.hashsalt": "forgec", "svg.fonttype": "none", "font.family": "DejaVu Sans"}
    with matplotlib.rc_context(rc):
        labels = {n: _label(n, data) for n, data in graph.nodes(data=True)}
        figure = Figure(dpi=72)
        renderer = FigureCanvasAgg(figure).get_renderer()
        sizes = _measure(graph, labels, figure, renderer)
        title = f"{graph.graph.get('name', 'model')} ({view})"
        title_width = _text_size(figure, renderer, title, _FONT_SIZE + 2)[0]
        x, y, routes, width, height = _layout(graph, sizes, title_width)
        figure.set_size_inches(width, height)
        ax = figure.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)  # rows go down
        ax.set_axis_off()
        ax.text(_MARGIN, _MARGIN, title, fontsize=_FONT_SIZE + 2, va="top", parse_math=False,
                gid="title")

        # Each node is the group `node-I` (its outline) and `label-I` (its text), each edge
        # `edge-J`, in the graph's order: the JSON output's order.
        for i, (n, data) in enumerate(graph.nodes(data=True)):
            kind = data.get("kind", "op")
            w, h = sizes[n]
            fill = _FILL.get(kind, "#ffffff")
            if kind in _ROUND:
                outline = Circle((x[n], y[n]), w / 2, facecolor=fill, edgecolor="#333333",
                                 linewidth=0.8, clip_on=False)
                label = "+" if labels[n] is None else labels[n]
                size = _FONT_SIZE + 2 if labels[n] is None else _FONT_SIZE - 2
            else:
                rounding = min(w, h) / 2 if kind in ("input", "output") else 0.06
                outline = FancyBboxPatch(
                    (x[n] - w / 2, y[n] - h / 2), w, h, facecolor=fill, edgecolor="#333333",
                    linewidth=0.8, clip_on=False, linestyle="--" if kind in _DASHED else "-",
                    boxstyle=f"round,pad=0,rounding_size={rounding:.4f}")
                label, size = labels[n], _FONT_SIZE
            outline.set_gid(f"node-{i}")
            ax.add_patch(outline)
            ax.text(x[n], y[n], label, fontsize=size, ha="center", va="center",
                    multialignment="center", parse_math=False, clip_on=False, gid=f"label-{i}")

        def port(n, toward, side):
            """Where an edge toward x = `toward` leaves (side 1: bottom) or enters (side -1:
            top) node n: on its outline, a little off centre toward the edge's direction."""
            w, h = sizes[n]
            dx = min(max(toward - x[n], -0.3 * w), 0.3 * w)
            if graph.nodes[n].get("kind") in _ROUND:
                return x[n] + dx, y[n] + side * math.sqrt((w / 2) ** 2 - dx**2)
            return x[n] + dx, y[n] + side * h / 2

        for j, (route, (_, _, modality)) in enumerate(
                zip(routes, graph.edges(data="modality"), strict=True)):
            u, v = route[0], route[-1]
            points = [(x[u], y[u])]
            for n in route[1:-1]:
                points += [(x[n], y[n] - sizes[n][1] / 2), (x[n], y[n] + sizes[n][1] / 2)]
            points.append((x[v], y[v]))
            if y[v] > y[u]:  # leave the source's bottom, enter the target's top
                points[0] = port(u, points[1][0], 1)
                points[-1] = port(v, points[-2][0], -1)
            color, style = _EDGE_BY_MODALITY.get(modality, _EDGE)
            ax.add_patch(FancyArrowPatch(path=Path(points), arrowstyle="-|>,head_length=0.4,"
                                         "head_width=0.2", mutation_scale=12, color=color,
                                         linestyle=style, linewidth=0.8, shrinkA=0, shrinkB=0,
                                         clip_on=False, gid=f"edge-{j}"))
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()
