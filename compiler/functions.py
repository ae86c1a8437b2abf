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
    )
}
