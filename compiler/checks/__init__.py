"""Validation passes over a lowered model, run in this order.

Each pass is a module with one job and a `run(graph, diags)` function; the
graph carries the bound model as `graph.graph["model"]` (a VLM's graph: the
bound `vlm`, and its `text` and `vision` models). A pass that reads
the dataflow structure sets `STRUCTURAL = True` and is skipped when binding
already failed (a missing value would make it report consequences, not
causes); argument-level passes always run, so independent errors of a file
are reported together. Passes only report:
they never change the graph, except `causality`, which records its finding
(`supports_kv_cache`) as a graph attribute for `info` and codegen.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics
from . import causality, dangling, modality, names, op_rules, positive_sizes, rotary, shapes

PASSES = (names, positive_sizes, op_rules, rotary, shapes, dangling, causality)
# over the one graph of a vision-language model (compiler/lower.py, `lower_vlm`),
# once its text model and vision encoder passed the checks above
VLM_PASSES = (modality, causality)


def run_checks(graph: nx.MultiDiGraph, diags: Diagnostics, *, bound_cleanly: bool = True) -> None:
    for check in PASSES:
        if bound_cleanly or not getattr(check, "STRUCTURAL", False):
            check.run(graph, diags)


def run_vlm_checks(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for check in VLM_PASSES:
        check.run(graph, diags)

