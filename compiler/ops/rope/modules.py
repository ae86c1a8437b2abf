"""Applying rotary position embeddings (the tables are built by the model)."""

from __future__ import annotations

import torch

PARTIAL_ROTARY = True  # feature: only the first rotary_dim channels of a head rotate


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, hd) by (B or 1, S, rotary_dim) tables, in fp32."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if PARTIAL_ROTARY:
        rotary_dim = cos.shape[-1]
        x, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (x.float() * cos + rotated * sin).type_as(x)
    if PARTIAL_ROTARY:
        return torch.cat([out, x_pass], dim=-1)
    return out
