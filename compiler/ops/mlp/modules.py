"""Position-wise MLPs (B, S, dim) → (B, S, dim)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ZERO_INIT = True  # feature: some MLP starts at zero (`zero_init = true`)


class SwiGLU(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """Two-layer MLP: down(gelu(up(x)))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        bias: bool = False,
        zero_init: bool = False,  # if ZERO_INIT
    ) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        if ZERO_INIT:
            self.zero_init = zero_init

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.down_proj.weight)
        else:
            nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)
        for proj in (self.up_proj, self.down_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class ReluMLP(nn.Module):
    """Two-layer MLP: down(relu(up(x)))."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        bias: bool = False,
        zero_init: bool = False,  # if ZERO_INIT
    ) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        if ZERO_INIT:
            self.zero_init = zero_init

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.down_proj.weight)
        else:
            nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)
        for proj in (self.up_proj, self.down_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)))
