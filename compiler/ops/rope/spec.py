"""Rotary position embeddings: settings that attention ops name."""

from __future__ import annotations

from typing import Any

from ..core import ArgSpec, Foreign, OpDef


def _rope_derive(a: dict[str, Any]) -> None:
    if a.get("rotary_dim") is None:
        a["rotary_dim"] = a["head_dim"]


def _check_rope(comp: Any, model: Any, diags: Any) -> None:
    """E072/E076: channels rotate in pairs, no wider than the head."""
    a, spans = comp.args, comp.arg_spans
    hd, rd = a["head_dim"], a["rotary_dim"]
    if hd <= 0 or rd <= 0:
        return
    if rd % 2:
        where = "rotary_dim" if "rotary_dim" in spans else "head_dim"
        diags.error("E072", f"rotary dimension {rd} is odd; RoPE rotates channel pairs",
                    spans.get(where, comp.span))
    if rd > hd:
        diags.error("E076", f"rotary_dim {rd} exceeds head_dim {hd}",
                    spans.get("rotary_dim", comp.span))


def _check_rope2d(comp: Any, model: Any, diags: Any) -> None:
    """E072: rows and columns each turn channel pairs: head_dim divisible by 4."""
    hd = comp.args["head_dim"]
    if hd > 0 and hd % 4:
        diags.error("E072", f"2-D rotary positions need head_dim divisible by 4, got "
                    f"{hd} (rows and columns each turn channel pairs)",
                    comp.arg_spans.get("head_dim", comp.span))


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
            ArgSpec("local_theta", "float", 0.0, min=0.0,
                    doc="a second base, for the attentions with local_rope = true "
                        "(Gemma 3's local layers); 0 for none"),
        ),
        sizes=("head_dim", "max_seq_len", "rotary_dim", "original_max_seq_len"),
        derive=_rope_derive,
        slots=("positions",), check=_check_rope,
        derived_code={"rotary_dim": "{head_dim}"},
        # the rotary tables of a Hugging Face / KempnerForge decoder
        foreign={"hf": Foreign("positions"), "kf": Foreign("positions")},
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
        slots=("vision_positions",), check=_check_rope2d,
        code=("rope2d_tables",),
    ),
)
