"""Causality: a model supports a KV cache only if every op it decodes with is causal.

Any non-causal op (bidirectional attention, expert-choice routing) makes the
model training-only; the finding is recorded on the graph
(`supports_kv_cache`, `non_causal`) and stated as a note with the op's place.
In a VLM's graph only the decoder's side counts: the image is encoded once,
before decoding, so the vision encoder and adapter may look at all of it; a
fusion that is not causal (MoMa's expert choice) makes the VLM training-only,
noted at the fusion. Its text model was checked on its own (and noted there),
so its ops are recorded here, not noted again.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics
from ..lower import FUSION, TEXT_PREFIX
from ..ops import OPS

DECODED = (None, TEXT_PREFIX, FUSION)  # the parts of a graph a KV cache decodes through


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    vlm = graph.graph.get("vlm")
    if vlm is None and graph.graph["model"].kind == "vision":
        return  # an encoder sees the whole image at once; it is never decoded
    offenders = []
    for _, data in graph.nodes(data=True):
        if data["kind"] == "op" and data["ok"] and data.get("part") in DECODED:
            op = OPS[data["op"]]
            if not op.causal(data["args"]):
                offenders.append((data["fqn"] or data["component"], data["decl_span"], op.name))
    graph.graph["supports_kv_cache"] = not offenders
    graph.graph["non_causal"] = [(fqn, span) for fqn, span, _ in offenders]
    if vlm is not None:  # its decoder's own ops were noted with the text model
        offenders = [o for o in offenders if o[0] == FUSION]
    if offenders:
        fqn, span, op = offenders[0]
        more = f" (and {len(offenders) - 1} more)" if len(offenders) > 1 else ""
        diags.note("N001", f"{'model' if vlm is None else 'vlm'} '{graph.graph['name']}' is "
                   f"training-only: {op} '{fqn}' is not causal{more}, so it cannot decode with "
                   "a KV cache", span)
