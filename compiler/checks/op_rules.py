"""Each op's own rules (`OpDef.check`), run on every component that binds cleanly.

The rules live with their op in compiler/ops/<family>/spec.py: attention heads
and KV groups (E070/E071) and its rope (E075/E078), rotary widths (E072/E076),
patches tiling images (E137), tied heads (E074), expert routing (E100/E101).
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    model = graph.graph["model"]
    for comp in model.all_components():
        if comp.op.check is not None:
            comp.op.check(comp, model, diags)
