"""Position-wise MLPs: gated (SwiGLU) and two-layer (GELU, ReLU)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core import Args, ArgSpec, Foreign, OpDef, Shape, hidden, numel


def mlp_weights(names: tuple[str, ...], a: Args) -> dict[str, Shape]:
    """Parameters of an MLP with the named projections (`down_proj` maps back to dim)."""
    dim, width = a["dim"], a["hidden"]
    w: dict[str, Shape] = {}
    for n in names:
        w[f"{n}.weight"] = (dim, width) if n == "down_proj" else (width, dim)
        if a.get("bias"):
            w[f"{n}.bias"] = (dim,) if n == "down_proj" else (width,)
    return w


def mlp_op(name: str, doc: str, projections: tuple[str, ...], bias: bool,
           class_name: str, foreign: Mapping[str, Foreign] | None = None) -> OpDef:
    """An MLP op: `dim` → `hidden` → `dim` through the named projections."""
    args = [
        ArgSpec("dim", "size", doc="model width"),
        ArgSpec("hidden", "size", doc="hidden width (see ffn_hidden())"),
    ]
    if bias:
        args.append(ArgSpec("bias", "bool", False, doc="biases on the projections"))
    args.append(ArgSpec("zero_init", "bool", False, doc="zero-initialise down_proj"))

    def ctor(a: Args, u: frozenset[str]) -> dict[str, Any]:
        return {"dim": a["dim"], "hidden": a["hidden"], **({"bias": a["bias"]} if bias else {}),
                **({"zero_init": a["zero_init"]} if "zero_init" in u else {})}

    return OpDef(
        class_name=class_name, slots=("mlp",), foreign=foreign or {},
        tp={**{p: "colwise" for p in projections if p != "down_proj"}, "down_proj": "rowwise"},
        ctor=ctor,
        features=lambda a: frozenset({"zero_init"} if a["zero_init"] else ()),
        name=name, doc=doc, args=tuple(args), sizes=("dim", "hidden"),
        inputs=lambda a: (hidden(a["dim"]),),
        output=lambda a: hidden(a["dim"]),
        weights=lambda a: mlp_weights(projections, a),
        flops=lambda a, s: 2 * sum(numel(v) for k, v in mlp_weights(projections, a).items()
                                   if k.endswith("weight")),
    )


# Hugging Face's hidden_act of a SiLU-gated MLP (swish is SiLU's other name)
SILU = ("silu", "swish")

OPS = (
    mlp_op("swiglu", "SwiGLU MLP: down(silu(gate(x)) * up(x)).",
           ("gate_proj", "up_proj", "down_proj"), bias=False, class_name="SwiGLU",
           foreign={"hf": Foreign("mlp", {"hidden_act": SILU}),
                    "kf": Foreign("mlp", {"activation": ("silu",)}, by_default=True)}),
    # KempnerForge's activation = "gelu" / "relu": a two-layer MLP without biases
    mlp_op("gelu_mlp", "Two-layer MLP with exact (erf) GELU.", ("up_proj", "down_proj"),
           bias=True, class_name="GeluMLP",
           foreign={"kf": Foreign("mlp", {"activation": ("gelu",)}),
                    # Hugging Face's two-layer MLPs with exact GELU (GPT-NeoX)
                    "hf": Foreign("two_layer_mlp", {"hidden_act": ("gelu",)})}),
    mlp_op("relu_mlp", "Two-layer MLP with ReLU.", ("up_proj", "down_proj"), bias=True,
           class_name="ReluMLP",
           foreign={"kf": Foreign("mlp", {"activation": ("relu",)}),
                    "hf": Foreign("two_layer_mlp", {"hidden_act": ("relu",)})}),
)
