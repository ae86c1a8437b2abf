"""Compile-time functions usable in parameter expressions, e.g. `ffn_hidden(dim)`.

They declare their arguments with the same `ArgSpec` as ops, so binding and
error reporting are shared (compiler/bind.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .ops import ArgSpec


@dataclass(frozen=True)
class FunctionDef:
    name: str
    doc: str
    args: tuple[ArgSpec, ...]
    impl: Callable[[dict[str, Any]], Any]

    def arg(self, name: str) -> ArgSpec | None:
        return next((a for a in self.args if a.name == name), None)


def _ffn_hidden(a: dict[str, Any]) -> int:
    # Llama's rule: 2/3 of 4·dim, scaled, rounded up to a multiple.
    hidden = int(8 * a["dim"] * a["multiplier"] / 3)
    m = a["multiple_of"]
    return m * math.ceil(hidden / m)


FUNCTIONS: dict[str, FunctionDef] = {
    f.name: f
    for f in (
        FunctionDef(
            "ffn_hidden",
            "Llama's MLP width: multiple_of · ceil(int(8/3 · dim · multiplier) / multiple_of).",
            (
                ArgSpec("dim", "size"),
                ArgSpec("multiplier", "float", 1.0, min=0.0),
                ArgSpec("multiple_of", "size", 256),
            ),
            _ffn_hidden,
        ),
        FunctionDef("min", "The smaller of two numbers.",
                    (ArgSpec("a", "number"), ArgSpec("b", "number")),
                    lambda a: min(a["a"], a["b"])),
        FunctionDef("max", "The larger of two numbers.",
                    (ArgSpec("a", "number"), ArgSpec("b", "number")),
                    lambda a: max(a["a"], a["b"])),
        FunctionDef("sqrt", "The square root of a non-negative number, a float.",
                    (ArgSpec("x", "number", min=0.0),),
                    lambda a: math.sqrt(a["x"])),
    )
}


# ---- element-wise functions of tensors (block and module dataflow) ---------------------
# One place for every activation a spec may apply: its compile-time arguments (the
# tensor is the first, positional argument), the PyTorch expression generated for
# it ({x} the tensor, then its arguments by name) and a note for the docs. They are
# dataflow functions, not ops: they have no parameters and no module of their own.


@dataclass(frozen=True)
class ActivationDef:
    name: str
    doc: str
    code: str  # PyTorch over {x} and the arguments
    args: tuple[ArgSpec, ...] = ()


ACTIVATIONS: dict[str, ActivationDef] = {
    a.name: a
    for a in (
        ActivationDef("silu", "x · sigmoid(x) (SwiGLU's gate).", "F.silu({x})"),
        ActivationDef("gelu", "exact (erf) GELU.", "F.gelu({x})"),
        ActivationDef("gelu_tanh", "the tanh approximation of GELU (GeGLU's gate).",
                      'F.gelu({x}, approximate="tanh")'),
        ActivationDef("relu", "max(x, 0).", "F.relu({x})"),
        ActivationDef("sigmoid", "1 / (1 + exp(-x)) (gates).", "torch.sigmoid({x})"),
        ActivationDef("tanh", "the hyperbolic tangent.", "torch.tanh({x})"),
        ActivationDef("square", "x² (ReLU² is `square(relu(x))`).", "torch.square({x})"),
        ActivationDef("softcap", "cap · tanh(x / cap): soft-capping to (-cap, cap).",
                      "{cap} * torch.tanh({x} / {cap})",
                      (ArgSpec("cap", "float", min=0.0, doc="the bound, > 0"),)),
    )
}
