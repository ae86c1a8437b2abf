"""Rotary position embeddings: applying them, and a vision encoder's 2-D tables (a
decoder's 1-D tables are built by the model)."""

from __future__ import annotations

import torch

PARTIAL_ROTARY = True  # feature: only the first rotary_dim channels of a head rotate
CLS_TOKEN = True  # feature: the vision encoder prepends a CLS token to its patches


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


def rope2d_tables(
    grid: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE cos/sin (grid², head_dim) in fp32, half-split layout: half of a head's
    rotary pairs turn with the patch row, half with the column (row-major patches); with
    a CLS token, a first row that does not rotate."""
    quarter = head_dim // 4  # a quarter of the channels: half the pairs per axis
    inv_freq = 1.0 / (theta ** (torch.arange(quarter, device=device).float() / quarter))
    rows = torch.arange(grid, device=device).float().repeat_interleave(grid)
    cols = torch.arange(grid, device=device).float().repeat(grid)
    angles = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)
    if CLS_TOKEN:
        angles = torch.cat([angles.new_zeros(1, angles.shape[1]), angles])
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()
