"""Causality: a model supports a KV cache only if every op is causal.

Any non-causal op (bidirectional attention, expert-choice routing) makes the
model training-only; the finding is recorded on the graph
(`supports_kv_cache`, `non_causal`) and stated as a note with the op's place.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics
from ..ops import OPS


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    if graph.graph["model"].kind == "vision":
        return  # an encoder sees the whole image at once; it is never decoded
    offenders = []
    for _, data in graph.nodes(data=True):
        if data["kind"] == "op" and data["ok"]:
            op = OPS[data["op"]]
            if not op.causal(data["args"]):
                offenders.append((data["fqn"], data["decl_span"], op.name))
    graph.graph["supports_kv_cache"] = not offenders
    graph.graph["non_causal"] = [(fqn, span) for fqn, span, _ in offenders]
    if offenders:
        fqn, span, op = offenders[0]
        more = f" (and {len(offenders) - 1} more)" if len(offenders) > 1 else ""
        diags.note("N001", f"model '{graph.graph['name']}' is training-only: {op} '{fqn}' is "
                   f"not causal{more}, so it cannot decode with a KV cache", span)
