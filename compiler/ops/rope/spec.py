"""Rotary position embeddings: settings that attention ops name."""

from __future__ import annotations

from typing import Any

from ..core import ArgSpec, OpDef


def _rope_derive(a: dict[str, Any]) -> None:
    if a.get("rotary_dim") is None:
        a["rotary_dim"] = a["head_dim"]


OPS = (
    OpDef(
        name="rope",
        role="config",
        doc="Rotary position embedding settings, shared by the attention ops that name it.",
        args=(
            ArgSpec("head_dim", "size", doc="per-head width the tables are built for"),
            ArgSpec("max_seq_len", "size"),
            ArgSpec("theta", "float", 10000.0, min=1.0),
            ArgSpec("rotary_dim", "size", derived=True,
                    doc="rotate only the first rotary_dim channels (partial rotary)"),
            ArgSpec("scaling", "choice", "none", choices=("none", "llama3")),
            ArgSpec("scale_factor", "float", 8.0, min=1.0),
            ArgSpec("low_freq_factor", "float", 1.0, min=0.0),
            ArgSpec("high_freq_factor", "float", 4.0, min=0.0),
            ArgSpec("original_max_seq_len", "size", 8192),
            ArgSpec("doc_restart", "bool", False,
                    doc="restart positions at every document of a packed sequence"),
        ),
        sizes=("head_dim", "max_seq_len", "rotary_dim", "original_max_seq_len"),
        derive=_rope_derive,
        slots=("positions",),
        derived_code={"rotary_dim": "{head_dim}"},
    ),
    OpDef(
        name="rope2d",
        role="config",
        doc="2-D rotary positions for a vision encoder: half of each head's rotary pairs "
            "turn with the patch row, half with the column (a CLS token stays unrotated).",
        args=(
            ArgSpec("head_dim", "size", doc="per-head width; a multiple of 4"),
            ArgSpec("grid", "size", doc="patches per image side"),
            ArgSpec("theta", "float", 100.0, min=1.0),
        ),
        sizes=("head_dim", "grid"),
        slots=("vision_positions",),
    ),
)
