"""Rotary position embeddings: settings that attention ops name."""

from __future__ import annotations

import math
from typing import Any

from ..core import ArgSpec, Foreign, OpDef

# the frequency scalings (transformers' rope_type) and the arguments each reads
SCALING_ARGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "llama3": ("scale_factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
    "linear": ("scale_factor",),
    "dynamic": ("scale_factor", "original_max_seq_len"),
    "yarn": ("scale_factor", "original_max_seq_len", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"),
    "longrope": ("scale_factor", "original_max_seq_len", "short_factor", "long_factor",
                 "attention_factor"),
}
_SCALING_ONLY = tuple(dict.fromkeys(a for args in SCALING_ARGS.values() for a in args))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 · mscale · ln(factor) + 1 (1 for factor ≤ 1),
    transformers' get_mscale / DeepSeek's yarn_get_mscale."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_derive(a: dict[str, Any]) -> None:
    if a.get("rotary_dim") is None:
        a["rotary_dim"] = a["head_dim"]
    scaling = a.get("scaling")
    if a.get("scale_factor") is None:
        # transformers' rule for yarn and longrope without a factor: the context's growth
        a["scale_factor"] = (a["max_seq_len"] / a["original_max_seq_len"]
                             if scaling in ("yarn", "longrope") else 8.0)
    if a.get("attention_factor") is None:
        a["attention_factor"] = default_attention_factor(a)


def default_attention_factor(a: dict[str, Any]) -> float:
    """transformers' attention factor of a YaRN or LongRoPE scaling that gives none (1
    for the others)."""
    factor, scaling = a["scale_factor"], a["scaling"]
    if scaling == "yarn":
        if a["mscale"] and a["mscale_all_dim"]:
            return yarn_mscale(factor, a["mscale"]) / yarn_mscale(factor, a["mscale_all_dim"])
        return yarn_mscale(factor)
    if scaling == "longrope" and factor > 1.0:
        return math.sqrt(1 + math.log(factor) / math.log(a["original_max_seq_len"]))
    return 1.0


def _check_rope(comp: Any, model: Any, diags: Any) -> None:
    """E072/E076: channels rotate in pairs, no wider than the head; E170-E173: the
    frequency scaling's arguments."""
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
    scaling = a["scaling"]
    reads = SCALING_ARGS[scaling]
    for name in _SCALING_ONLY:
        if name in spans and name not in reads:
            users = [s for s, args in SCALING_ARGS.items() if name in args]
            diags.error("E170", f"{name} is an argument of scaling = {' or '.join(users)}, "
                        f"not of scaling = {scaling}", spans[name],
                        hint=f"scaling = {scaling} reads "
                        + (", ".join(reads) if reads else "no further argument"))
    if scaling == "longrope":
        for name in ("short_factor", "long_factor"):
            factors = a[name]
            if name not in spans:
                diags.error("E171", f"scaling = longrope needs {name}, a list of rotary_dim "
                            f"/ 2 = {rd // 2} frequency factors", spans.get("scaling", comp.span))
            elif len(factors) != rd // 2:
                diags.error("E171", f"{name} has {len(factors)} factors; rotary_dim {rd} "
                            f"turns {rd // 2} frequencies, one factor each", spans[name])
            elif any(f <= 0 for f in factors):
                diags.error("E171", f"{name} holds a factor ≤ 0: each divides a frequency",
                            spans[name])
    if scaling == "yarn" and "scale_factor" not in spans and a["scale_factor"] < 1.0:
        diags.error("E172", f"scale_factor {a['scale_factor']:g} is below 1: scaling "
                    "stretches the context, derived here as max_seq_len / original_max_seq_len "
                    f"= {a['max_seq_len']} / {a['original_max_seq_len']}",
                    spans.get("original_max_seq_len", spans.get("scaling", comp.span)))
    if "attention_factor" in spans and a["attention_factor"] <= 0:
        diags.error("E173", f"attention_factor {a['attention_factor']:g} must be positive: "
                    "it scales the cos and sin tables", spans["attention_factor"])
    if a["local_theta"] and scaling in ("dynamic", "longrope"):
        diags.error("E174", f"scaling = {scaling} with local_theta: the tables of a "
                    "length-dependent scaling and of a second base cannot be combined",
                    spans.get("local_theta", comp.span))


def _check_rope2d(comp: Any, model: Any, diags: Any) -> None:
    """E072: rows and columns each turn channel pairs: head_dim divisible by 4."""
    hd = comp.args["head_dim"]
    if hd > 0 and hd % 4:
        diags.error("E072", f"2-D rotary positions need head_dim divisible by 4, got "
                    f"{hd} (rows and columns each turn channel pairs)",
                    comp.arg_spans.get("head_dim", comp.span))


def _rope_features(a: dict[str, Any]) -> frozenset[str]:
    scaling = a["scaling"]
    out = set()
    if scaling != "none":
        out.add(f"{scaling}_scaling")
    reads = SCALING_ARGS[scaling]
    if "scale_factor" in reads and scaling != "longrope":
        out.add("scale_factor")
    if "original_max_seq_len" in reads:
        out.add("original_context")
    if scaling in ("dynamic", "longrope"):
        out.add("length_dependent_rope")
    if "attention_factor" in reads and a["attention_factor"] != 1.0:
        out.add("rope_attention_factor")
    if a["local_theta"]:
        out.add("local_theta")
    return frozenset(out)


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
            ArgSpec("scaling", "choice", "none", choices=tuple(SCALING_ARGS)),
            ArgSpec("scale_factor", "float", min=1.0, derived=True),
            ArgSpec("low_freq_factor", "float", 1.0, min=0.0),
            ArgSpec("high_freq_factor", "float", 4.0, min=0.0),
            ArgSpec("original_max_seq_len", "size", 8192),
            ArgSpec("doc_restart", "bool", False,
                    doc="restart positions at every document of a packed sequence"),
            ArgSpec("local_theta", "float", 0.0, min=0.0,
                    doc="a second base, for the attentions with local_rope = true "
                        "(Gemma 3's local layers); 0 for none"),
            # -- YaRN's and LongRoPE's (a rope op of its own would need the same tables)
            ArgSpec("beta_fast", "float", 32.0, min=0.0),
            ArgSpec("beta_slow", "float", 1.0, min=0.0),
            ArgSpec("mscale", "float", 0.0, min=0.0),
            ArgSpec("mscale_all_dim", "float", 0.0, min=0.0),
            ArgSpec("attention_factor", "float", derived=True),
            ArgSpec("truncate", "bool", True),
            ArgSpec("short_factor", "floats", None),
            ArgSpec("long_factor", "floats", None),
        ),
        sizes=("head_dim", "max_seq_len", "rotary_dim", "original_max_seq_len"),
        derive=_rope_derive,
        slots=("positions",), check=_check_rope,
        derived_code={"rotary_dim": "{head_dim}"},
        code=("rotary_tables",), features=_rope_features,
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
