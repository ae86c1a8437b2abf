"""RMSNorm and LayerNorm, computed in fp32 whatever the model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNIT_OFFSET = True  # feature: some RMSNorm stores its weight minus one (Gemma: x̂ · (1 + w))
NORM_WITHOUT_WEIGHT = True  # feature: some LayerNorm has no weight (`weight = false`)
LAYERNORM_UNIT_OFFSET = True  # feature: some LayerNorm scales by 1 + w (Nemotron's LayerNorm1P)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32."""

    def __init__(
        self,
        dim: int,
        eps: float,
        unit_offset: bool = False,  # if UNIT_OFFSET
    ) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        if UNIT_OFFSET:
            self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        if UNIT_OFFSET and self.unit_offset:
            nn.init.zeros_(self.weight)  # the scale 1 + w starts at one
        else:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if UNIT_OFFSET and self.unit_offset:
            # the scale 1 + w in fp32, as Gemma's checkpoints are trained with
            normed = F.rms_norm(x.float(), (self.dim,), None, self.eps)
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, computed in fp32."""

    def __init__(
        self,
        dim: int,
        eps: float,
        bias: bool = True,
        weight: bool = True,  # if NORM_WITHOUT_WEIGHT
        unit_offset: bool = False,  # if LAYERNORM_UNIT_OFFSET
    ) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        if LAYERNORM_UNIT_OFFSET:
            self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        if NORM_WITHOUT_WEIGHT and not weight:
            self.weight = None  # OLMo's LayerNorm learns no scale
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def init_weights(self) -> None:
        if NORM_WITHOUT_WEIGHT and self.weight is None:
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            return
        if LAYERNORM_UNIT_OFFSET and self.unit_offset:
            nn.init.zeros_(self.weight)  # the scale 1 + w starts at one
        else:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        if NORM_WITHOUT_WEIGHT and self.weight is None:
            return F.layer_norm(x.float(), (self.dim,), None, bias, self.eps).type_as(x)
        if LAYERNORM_UNIT_OFFSET and self.unit_offset:
            scale = 1.0 + self.weight.float()
            return F.layer_norm(x.float(), (self.dim,), scale, bias, self.eps).type_as(x)
        return F.layer_norm(x.float(), (self.dim,), self.weight.float(), bias, self.eps).type_as(x)
