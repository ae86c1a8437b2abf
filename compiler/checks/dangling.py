"""E054: every computed value reaches the block's output (no dangling outputs)."""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics

STRUCTURAL = True


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for node, data in graph.nodes(data=True):
        if data["kind"] in ("op", "add", "scale", "mul", "sub", "act") and graph.out_degree(node) == 0 \
                and not data.get("block_output"):
            what = f"'{data['component']}'" if data["kind"] == "op" else "this value"
            diags.error("E054", f"the result of {what} is never used", data["span"],
                        hint="use it, return it, or remove it")
