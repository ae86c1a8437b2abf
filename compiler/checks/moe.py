"""E100/E101: mixture-of-experts routing is well-formed.

`0 < top_k ≤ experts`; with group-limited routing the groups divide the
experts evenly, a token may use at most all groups, and the groups it may use
hold at least top_k experts.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for comp in graph.graph["model"].all_components():
        if comp.op.name != "moe":
            continue
        a, spans = comp.args, comp.arg_spans
        experts, k = a["experts"], a["top_k"]
        if experts <= 0:
            continue  # reported by positive_sizes
        if not 0 < k <= experts:
            diags.error("E100", f"top_k must be in 1..{experts} (the number of experts), got {k}",
                        spans.get("top_k", comp.span))
            continue
        router = a["router"].component
        if router.op.name != "sigmoid_topk":
            continue
        r, rspans = router.args, router.arg_spans
        groups, topk_group = r["n_group"], r["topk_group"]
        if experts % groups:
            diags.error("E101", f"{experts} experts do not split into {groups} equal groups",
                        rspans.get("n_group", router.span))
        elif topk_group > groups:
            diags.error("E101", f"topk_group {topk_group} exceeds n_group {groups}",
                        rspans.get("topk_group", router.span))
        elif k > topk_group * (experts // groups):
            diags.error("E101", f"top_k {k} exceeds the {topk_group * (experts // groups)} "
                        f"experts in {topk_group} of {groups} groups",
                        spans.get("top_k", comp.span),
                        hint="raise topk_group or lower top_k")
