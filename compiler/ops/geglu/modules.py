"""GeGLU MLP (B, S, dim) → (B, S, dim)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZERO_INIT = True  # feature: some MLP starts at zero (`zero_init = true`)


class GeGLU(nn.Module):
    """GeGLU MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        zero_init: bool = False,  # if ZERO_INIT
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        if ZERO_INIT:
            self.zero_init = zero_init

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.down_proj.weight)
        else:
            nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gemma's "gelu_pytorch_tanh": the tanh approximation of GELU
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
