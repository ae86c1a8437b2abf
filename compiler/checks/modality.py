"""E131–E136: image tokens reach the text decoder, and fit it (a pass over a VLM graph).

Over the graph `lower_vlm` builds: the adapter takes the width the vision
encoder produces and gives the width the decoder's embedding has (E131); a
pooling adapter's window (`OpDef.pool_window`) tiles the patch grid (E134);
and the fusion's own rules, declared with its kind (`Fusion.check`,
compiler/ops/fusion/spec.py): image tokens and text fit the decoder's positions
when they share its sequence (E132), the modalities a routed fusion names are
this VLM's inputs (E136), cross-attention heads divide the decoder's width and
its blocks fire at all (E133). A routing fusion routes ops, not the text model's
own modules (E135). Errors sit at the argument of the vlm section that decides them.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics
from ..lower import ADAPTER, TEXT_PREFIX, VISION_PREFIX, producer


def _position_limit(text) -> int | None:
    rotary = next((c for c in text.all_components() if "positions" in c.op.slots), None)
    return rotary.args["max_seq_len"] if rotary is not None else text.params.get("max_seq_len")


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    vlm, text, vision = graph.graph["vlm"], graph.graph["text"], graph.graph["vision"]
    adapter = graph.nodes[ADAPTER]
    a, spans, where = adapter["args"], vlm.adapter.arg_spans, vlm.adapter.span
    vdim = graph.nodes[producer(graph, ADAPTER)]["shape"][-1]
    tdim = graph.nodes[f"{TEXT_PREFIX}.token_embedding"]["shape"][-1]
    if a["in_dim"] != vdim:
        diags.error("E131", f"the adapter takes width {a['in_dim']} but '{vision.name}' "
                    f"produces {vdim}", spans.get("in_dim", where), hint=f"use {vision.name}.dim")
    if a["out_dim"] != tdim:
        diags.error("E131", f"the adapter gives width {a['out_dim']} but '{text.name}' "
                    f"takes {tdim}", spans.get("out_dim", where), hint=f"use {text.name}.dim")
    pool_window = vlm.adapter.op.pool_window
    if pool_window:
        patch = graph.nodes[f"{VISION_PREFIX}.patch_embedding"]["args"]
        grid, window = patch["image_size"] // patch["patch"], a[pool_window]
        if patch["cls_token"]:
            diags.error("E134", "pooling adapters need the patch grid alone; the encoder adds "
                        "a CLS token", spans.get(pool_window, where))
        elif grid % window:
            diags.error("E134", f"pooling window {window} does not divide the {grid}×{grid} "
                        "patch grid", spans.get(pool_window, where))
    # the fusion's own rules: its modalities (E136), the decoder's positions (E132), its
    # blocks (E133)
    vlm.fusion.op.fusion.check(vlm.fusion, adapter["shape"][1], _position_limit(text), diags)
    fusion = vlm.fusion
    if fusion.op.fusion.routes:
        # a routed fusion copies or replaces the decoder's ops per modality, by their
        # FQNs; a module of the spec's own is one component of several ops
        composed = next((c for b in text.blocks.values() for c in b.components.values()
                         if c.module is not None), None)
        if composed is not None:
            diags.error("E135", f"{fusion.op.name} cannot route '{composed.name}', a module of "
                        f"'{text.name}'", fusion.span,
                        notes=[(f"module {composed.op.name} used here", composed.span)],
                        hint="use a fusion that does not route by modality, or ops in the "
                        "decoder's blocks")
