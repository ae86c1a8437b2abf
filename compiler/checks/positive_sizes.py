"""E073: every size argument of every component is a positive integer."""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for comp in graph.graph["model"].all_components():
        for name in comp.op.sizes:
            value = comp.args.get(name)
            spec = comp.op.arg(name)
            if spec is not None and spec.derived and name not in comp.arg_spans:
                continue  # follows from an argument that is reported itself
            if isinstance(value, int) and value <= 0:
                diags.error("E073", f"'{name}' of {comp.op.name} must be positive, got {value}",
                            comp.arg_spans.get(name, comp.span))
