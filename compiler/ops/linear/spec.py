"""A plain linear map."""

from __future__ import annotations

from ..core import ArgSpec, Foreign, OpDef, hidden

OPS = (
    OpDef(
        name="linear",
        doc="A plain linear map (B, S, in_dim) → (B, S, out_dim).",
        args=(
            ArgSpec("in_dim", "size"),
            ArgSpec("out_dim", "size"),
            ArgSpec("bias", "bool", False),
            ArgSpec("zero_init", "bool", False, doc="initialise the weight to zero"),
        ),
        sizes=("in_dim", "out_dim"),
        inputs=lambda a: (hidden(a["in_dim"]),),
        output=lambda a: hidden(a["out_dim"]),
        weights=lambda a: {"weight": (a["out_dim"], a["in_dim"]),
                           **({"bias": (a["out_dim"],)} if a["bias"] else {})},
        flops=lambda a, s: 2 * a["in_dim"] * a["out_dim"],
        class_name="Linear", slots=("adapter",),
        # the projections of the MLPs `forgec import-hf` writes as modules of the spec
        foreign={"hf": Foreign("projection")},
        splittable=True,
        features=lambda a: frozenset({"zero_init"} if a["zero_init"] else ()),
        ctor=lambda a, u: {"in_dim": a["in_dim"], "out_dim": a["out_dim"], "bias": a["bias"],
                           **({"zero_init": a["zero_init"]} if "zero_init" in u else {})},
    ),
)
