"""Rotary position embeddings: a decoder's tables (with their frequency scalings,
transformers' rope types), applying them, and a vision encoder's 2-D tables."""

from __future__ import annotations

import math

import torch

PARTIAL_ROTARY = True  # feature: only the first rotary_dim channels of a head rotate
CLS_TOKEN = True  # feature: the vision encoder prepends a CLS token to its patches
LOCAL_THETA = True  # feature: a second base, the local layers' (Gemma 3)
LLAMA3_SCALING = True  # feature: scaling = llama3
LINEAR_SCALING = True  # feature: scaling = linear
DYNAMIC_SCALING = True  # feature: scaling = dynamic
YARN_SCALING = True  # feature: scaling = yarn
LONGROPE_SCALING = True  # feature: scaling = longrope
SCALE_FACTOR = True  # feature: the scaling reads scale_factor
ORIGINAL_CONTEXT = True  # feature: the scaling reads the pre-training context
LENGTH_DEPENDENT_ROPE = True  # feature: the tables depend on the forward's length
ROPE_ATTENTION_FACTOR = True  # feature: cos and sin are scaled (YaRN, LongRoPE)


def rotary_tables(
    positions: int,
    rotary_dim: int,
    theta: float,
    *,
    local_theta: float,  # if LOCAL_THETA
    factor: float,  # if SCALE_FACTOR
    low_freq_factor: float,  # if LLAMA3_SCALING
    high_freq_factor: float,  # if LLAMA3_SCALING
    original_max_seq_len: int,  # if ORIGINAL_CONTEXT
    beta_fast: float,  # if YARN_SCALING
    beta_slow: float,  # if YARN_SCALING
    truncate: bool,  # if YARN_SCALING
    short_factor: tuple[float, ...],  # if LONGROPE_SCALING
    long_factor: tuple[float, ...],  # if LONGROPE_SCALING
    attention_factor: float,  # if ROPE_ATTENTION_FACTOR
    seq_len: int | torch.Tensor = 0,  # if LENGTH_DEPENDENT_ROPE
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin (positions, rotary_dim) in fp32, half-split, as transformers computes."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim))
    if LLAMA3_SCALING:
        # Llama 3 frequency scaling: long wavelengths slowed by factor, short ones
        # kept, a smooth blend in between.
        low, high, old_len = low_freq_factor, high_freq_factor, original_max_seq_len
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < old_len / high, inv_freq, scaled)
    if LINEAR_SCALING:
        inv_freq = inv_freq / factor  # positions slowed down by factor
    if DYNAMIC_SCALING:
        # NTK-aware: past the original context the base grows with the sequence, in
        # fp32 (transformers computes it from a tensor length). seq_len may be a tensor
        # (one compiled decode step serves every length): both kept, one chosen
        seq_len = torch.as_tensor(seq_len, device=device)
        growth = factor * seq_len / original_max_seq_len - (factor - 1)
        base = theta * growth ** (rotary_dim / (rotary_dim - 2))
        grown = 1.0 / (
            base ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim)
        )
        inv_freq = torch.where(seq_len > original_max_seq_len, grown, inv_freq)
    if YARN_SCALING:
        inv_freq = yarn_frequencies(
            inv_freq, theta, factor, original_max_seq_len, beta_fast, beta_slow, truncate
        )
    if LONGROPE_SCALING:
        # LongRoPE: a factor per frequency, the long ones once the forward's sequence
        # outgrows the pre-training context
        long = torch.as_tensor(seq_len, device=device) > original_max_seq_len
        factors = torch.where(
            long,
            torch.tensor(long_factor, dtype=torch.float32, device=device),
            torch.tensor(short_factor, dtype=torch.float32, device=device),
        )
        exponents = torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim
        inv_freq = 1.0 / (factors * theta**exponents)
    angles = torch.outer(torch.arange(positions, device=device).float(), inv_freq)
    if LOCAL_THETA:
        # the local layers' base: their angles follow, (positions, 2 · rotary_dim) in all
        local_freq = 1.0 / (
            local_theta ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim)
        )
        local = torch.outer(torch.arange(positions, device=device).float(), local_freq)
        angles = torch.cat([angles, angles, local, local], dim=-1)
    else:
        angles = torch.cat([angles, angles], dim=-1)
    if ROPE_ATTENTION_FACTOR:
        # scaled cos and sin scale every attention score by attention_factor²
        return angles.cos() * attention_factor, angles.sin() * attention_factor
    return angles.cos(), angles.sin()


def yarn_frequencies(
    inv_freq: torch.Tensor,
    theta: float,
    factor: float,
    original_max_seq_len: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
) -> torch.Tensor:
    """YaRN: frequencies turning fewer than beta_slow times over the original context
    are interpolated (divided by factor), those turning more than beta_fast times kept,
    a linear ramp between them."""
    rotary_dim = 2 * inv_freq.shape[0]

    def pair_of(rotations: float) -> float:  # the pair turning `rotations` times
        return (rotary_dim * math.log(original_max_seq_len / (rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = pair_of(beta_fast), pair_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    pairs = torch.arange(rotary_dim // 2, dtype=torch.float32, device=inv_freq.device)
    kept = 1 - ((pairs - low) / (high - low)).clamp(0, 1)
    exponents = torch.arange(0, rotary_dim, 2, device=inv_freq.device).float() / rotary_dim
    interpolated = 1.0 / (factor * theta**exponents)
    return interpolated * (1 - kept) + inv_freq * kept


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, hd) by (B or 1, S, rotary_dim) tables, in fp32."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if PARTIAL_ROTARY:
        rotary_dim = cos.shape[-1]
        x, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    if PARTIAL_ROTARY:
        out = (x.float() * cos + rotated * sin).type_as(x)
        return torch.cat([out, x_pass], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


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
