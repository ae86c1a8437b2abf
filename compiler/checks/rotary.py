"""E072/E075/E076/E077/E078: RoPE tables fit the attention that uses them.

The rotary dimension must be even (channels rotate in pairs), no wider than
the head, and a rope component's head_dim must equal the head_dim of every
attention that names it.
"""

from __future__ import annotations

import networkx as nx

from ..diagnostics import Diagnostics


def run(graph: nx.MultiDiGraph, diags: Diagnostics) -> None:
    ropes = [c for c in graph.graph["model"].all_components() if c.op.name == "rope"]
    for extra in ropes[1:]:
        # the generated Transformer computes one pair of RoPE tables per forward
        diags.error("E077", f"a model has one rope; '{extra.name}' is a second",
                    extra.name_span, notes=[("the first is here", ropes[0].name_span)])
    for comp in graph.graph["model"].all_components():
        a, spans = comp.args, comp.arg_spans
        if comp.op.name == "rope":
            hd, rd = a["head_dim"], a["rotary_dim"]
            if hd <= 0 or rd <= 0:
                continue
            if rd % 2:
                where = "rotary_dim" if "rotary_dim" in spans else "head_dim"
                diags.error("E072", f"rotary dimension {rd} is odd; RoPE rotates channel pairs",
                            spans.get(where, comp.span))
            if rd > hd:
                diags.error("E076", f"rotary_dim {rd} exceeds head_dim {hd}",
                            spans.get("rotary_dim", comp.span))
        elif comp.op.name == "rope2d":
            if a["head_dim"] > 0 and a["head_dim"] % 4:
                diags.error("E072", f"2-D rotary positions need head_dim divisible by 4, got "
                            f"{a['head_dim']} (rows and columns each turn channel pairs)",
                            spans.get("head_dim", comp.span))
        elif comp.op.name == "attention" and a.get("rope") is not None:
            rope = a["rope"].component
            kind = graph.graph["model"].kind
            wanted = "rope2d" if kind == "vision" else "rope"
            if rope.op.name != wanted:
                diags.error("E078", f"a {kind} section's attention takes a {wanted}, not "
                            f"{rope.op.name} '{rope.name}'", spans.get("rope", comp.span),
                            hint="rope2d turns with patch rows and columns: vision encoders "
                            "only" if kind != "vision" else "an image has rows and columns: "
                            "use rope2d(head_dim, grid)")
                continue
            if not rope.ok or a["head_dim"] is None or rope.args["head_dim"] <= 0:
                continue  # a non-positive head_dim is reported by positive_sizes
            if rope.args["head_dim"] != a["head_dim"]:
                diags.error("E075", f"rope '{rope.name}' is built for head_dim "
                            f"{rope.args['head_dim']} but this attention has head_dim "
                            f"{a['head_dim']}", spans.get("rope", comp.span),
                            notes=[("rope declared here", rope.span)])
