"""Normalisation over the last dimension."""

from __future__ import annotations

from ..core import ArgSpec, Foreign, OpDef, hidden


def _layernorm_check(comp, model, diags) -> None:
    """E191: a unit offset scales a weight the norm must have."""
    if comp.args["unit_offset"] and not comp.args["weight"]:
        diags.error("E191", "unit_offset = true on a LayerNorm without a weight",
                    comp.arg_spans.get("unit_offset", comp.span),
                    hint="the scale is 1 + weight: leave weight = false or unit_offset out")


OPS = (
    OpDef(
        name="rmsnorm",
        doc="RMSNorm over the last dimension, computed in fp32, with a weight.",
        args=(ArgSpec("dim", "size"), ArgSpec("eps", "float", 1e-5, min=0.0, max=1.0),
              ArgSpec("unit_offset", "bool", False,
                      doc="scale by 1 + weight (Gemma), the weight starting at zero")),
        sizes=("dim",),
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=lambda a: {"weight": (a["dim"],)},
        slots=("norm",),
        class_name="RMSNorm", init_args="",
        ctor=lambda a, u: {"dim": a["dim"], "eps": a["eps"],
                           **({"unit_offset": True} if a["unit_offset"] else {})},
        features=lambda a: frozenset({"unit_offset"}) if a["unit_offset"] else frozenset(),
        # Hugging Face's Llama-family decoders norm with it; KempnerForge's norm_type
        foreign={"hf": Foreign("norm"), "kf": Foreign("norm", {"norm_type": ("rmsnorm",)},
                                                          by_default=True)},
    ),
    OpDef(
        name="layernorm",
        doc="LayerNorm over the last dimension, with weight and (optionally) bias.",
        args=(
            ArgSpec("dim", "size"),
            ArgSpec("eps", "float", 1e-5, min=0.0, max=1.0),
            ArgSpec("bias", "bool", True),
            ArgSpec("weight", "bool", True,
                    doc="a learned scale; false: a non-parametric LayerNorm (OLMo)"),
            ArgSpec("unit_offset", "bool", False,
                    doc="scale by 1 + weight (Nemotron's LayerNorm1P), the weight starting at "
                    "zero"),
        ),
        sizes=("dim",),
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=lambda a: {**({"weight": (a["dim"],)} if a["weight"] else {}),
                           **({"bias": (a["dim"],)} if a["bias"] else {})},
        slots=("norm",),
        class_name="LayerNorm", init_args="",
        features=lambda a: frozenset(f for f, on in (("norm_without_weight", not a["weight"]),
                                                     ("layernorm_unit_offset", a["unit_offset"]))
                                     if on),
        ctor=lambda a, u: {"dim": a["dim"], "eps": a["eps"], "bias": a["bias"],
                           **({"weight": a["weight"]} if "norm_without_weight" in u else {}),
                           **({"unit_offset": True} if a["unit_offset"] else {})},
        check=_layernorm_check,
        # KempnerForge's layernorm has a bias, like nn.LayerNorm (the default); Hugging
        # Face's GPT-NeoX / GPT-J / Phi / StableLM / Starcoder2 / OLMo decoders norm with it
        foreign={"kf": Foreign("norm", {"norm_type": ("layernorm",)}),
                 "hf": Foreign("layer_norm")},
    ),
)
