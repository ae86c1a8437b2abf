"""E137: a vision encoder's patches tile its images exactly."""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    for comp in graph.graph["model"].all_components():
        if comp.op.name != "patch_embed":
            continue
        size, patch = comp.args["image_size"], comp.args["patch"]
        if size > 0 and patch > 0 and size % patch:
            diags.error("E137", f"patch {patch} does not tile images of {size} pixels",
                        comp.arg_spans.get("patch", comp.span),
                        hint="image_size must be a multiple of patch")
