"""E131–E136: image tokens reach the text decoder, and fit it (a pass over a VLM graph).

Over the graph `lower_vlm` builds: the adapter takes the width the vision
encoder produces and gives the width the decoder's embedding has (E131); a
pooling adapter's window tiles the patch grid (E134); image tokens and text fit
the decoder's positions when they share its sequence (E132); the modalities a
routed fusion names are this VLM's inputs (E136), and it routes ops, not the
text model's own modules (E135); cross-attention heads divide
the decoder's width and its blocks fire at all (E133). Errors sit at the
argument of the vlm section that decides them.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics
from ..lower import ADAPTER, PREFIXED, TEXT_PREFIX, VISION_PREFIX, producer

ROUTED = ("mot", "moma")  # components chosen per token by its modality


def _position_limit(text) -> int | None:
    rope = next((c for c in text.all_components() if c.op.name == "rope"), None)
    return rope.args["max_seq_len"] if rope is not None else text.params.get("max_seq_len")


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
    if adapter["op"] in ("avgpool", "attention_pool"):
        patch = graph.nodes[f"{VISION_PREFIX}.patch_embedding"]["args"]
        grid, window = patch["image_size"] // patch["patch"], a["window"]
        if patch["cls_token"]:
            diags.error("E134", "pooling adapters need the patch grid alone; the encoder adds "
                        "a CLS token", spans.get("window", where))
        elif grid % window:
            diags.error("E134", f"pooling window {window} does not divide the {grid}×{grid} "
                        "patch grid", spans.get("window", where))
    tokens = adapter["shape"][1]
    fusion = vlm.fusion
    f, fspans = fusion.args, fusion.arg_spans
    if fusion.op.name in ROUTED:
        names = f["modalities"]
        bad = [m for m in names if not m.isidentifier()]
        span = fspans.get("modalities", fusion.span)
        if bad:
            diags.error("E136", f"modality name {bad[0]!r} is not an identifier", span)
        elif len(set(names)) != len(names) or len(names) < 2:
            diags.error("E136", "modalities are two or more distinct names", span)
        elif not {"image", "text"} <= set(names):
            missing = sorted({"image", "text"} - set(names))
            diags.error("E136", f"the modalities must name this vlm's inputs: "
                        f"{', '.join(repr(m) for m in missing)} missing", span,
                        hint='image tokens come from the vision encoder, text from the tokens: '
                        '["image", "text"]')
        # a routed fusion copies (mot) or replaces (moma) the decoder's ops per modality,
        # by their FQNs; a module of the spec's own is one component of several ops
        composed = next((c for b in text.blocks.values() for c in b.components.values()
                         if c.module is not None), None)
        if composed is not None:
            diags.error("E135", f"{fusion.op.name} cannot route '{composed.name}', a module of "
                        f"'{text.name}'", fusion.span,
                        notes=[(f"module {composed.op.name} used here", composed.span)],
                        hint="use joint_decoder or cross_attention, or ops in the decoder's "
                        "blocks")
    if fusion.op.name in PREFIXED:
        limit = _position_limit(text)
        if limit is not None and tokens + f["max_text"] > limit:
            diags.error("E132", f"{tokens} image tokens + max_text {f['max_text']} exceed the "
                        f"decoder's max_seq_len {limit}", fspans.get("max_text", fusion.span),
                        hint=f"max_text ≤ {limit - tokens}")
    elif fusion.op.name == "cross_attention":
        if f["dim"] % f["heads"]:
            diags.error("E133", f"cross-attention heads {f['heads']} do not divide the text "
                        f"width {f['dim']}", fspans.get("heads", fusion.span))
        if f["every"] > f["n_layers"]:
            diags.error("E133", f"a block every {f['every']} layers never fires in "
                        f"{f['n_layers']} layers", fspans.get("every", fusion.span))
