"""E070/E071: attention widths split evenly into heads, and heads into KV groups."""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for comp in graph.graph["model"].all_components():
        if comp.op.name != "attention":
            continue
        a, spans = comp.args, comp.arg_spans
        dim, heads, kv = a["dim"], a["heads"], a["kv_heads"]
        if min(dim, heads, kv) <= 0:
            continue  # reported by positive_sizes
        if a["_head_dim_derived"] and dim % heads:
            near = [h for h in range(max(1, heads - 8), heads + 9) if dim % h == 0]
            diags.error("E070", f"dim {dim} is not divisible by heads {heads}",
                        spans.get("heads", comp.span),
                        hint="set head_dim explicitly" + (
                            f", or use heads = {min(near, key=lambda h: abs(h - heads))}"
                            if near else ""))
        if heads % kv:
            diags.error("E071", f"heads {heads} is not a multiple of kv_heads {kv}",
                        spans.get("kv_heads", spans.get("heads", comp.span)),
                        hint="each KV head serves an equal group of query heads")
