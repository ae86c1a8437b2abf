"""E074: a head tied to an embedding has the embedding's shape."""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for comp in graph.graph["model"].all_components():
        tie = comp.args.get("tie") if comp.op.name == "lm_head" else None
        if tie is None or not tie.component.ok:
            continue
        emb = tie.component.args
        head = (comp.args["vocab"], comp.args["dim"])
        table = (emb["vocab"], emb["dim"])
        if min(*head, *table) <= 0:
            continue  # reported by positive_sizes
        if head != table:
            diags.error("E074", f"'{comp.name}' ({head[0]} × {head[1]}) cannot share the "
                        f"weight of '{tie.component.name}' ({table[0]} × {table[1]})",
                        comp.arg_spans.get("tie", comp.span),
                        notes=[("embedding declared here", tie.component.span)])
            continue
        if comp.args["bias"]:
            diags.error("E074", "a tied head cannot have a bias of its own",
                        comp.arg_spans.get("bias", comp.span))
