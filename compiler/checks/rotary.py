"""E077: a model has one set of rotary tables.

The generated Transformer computes one pair of RoPE tables per forward; the
rules of a rope itself and of the attention that names it are the ops' own
(compiler/ops/rope/spec.py, compiler/ops/attention/spec.py).
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    ropes = [c for c in graph.graph["model"].all_components() if "positions" in c.op.slots]
    for extra in ropes[1:]:
        diags.error("E077", f"a model has one rope; '{extra.name}' is a second",
                    extra.name_span, notes=[("the first is here", ropes[0].name_span)])
