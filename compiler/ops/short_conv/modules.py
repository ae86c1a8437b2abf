"""A gated causal short convolution (LFM2's sequence mixer) and its decoding state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with caches


class ConvCache:
    """The decoding state of one convolution layer: its last `kernel - 1` inputs, a
    fixed size per sequence whatever its length.

    Like a KV cache it counts the positions seen (`length`, `valid`, `next_pos`), so
    that a model mixing attention and convolution layers reads them from any layer's
    cache.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        channels: int,
        kernel: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.conv_state = torch.zeros(batch_size, channels, kernel - 1, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_seq_len = max_seq_len

    def convolve(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """`conv` over (B, C, S) inputs continuing the cached ones; keeps the last."""
        x = torch.cat([self.conv_state.to(x.dtype), x], dim=2)
        self.conv_state.copy_(x[:, :, x.shape[2] - self.conv_state.shape[2] :])
        return F.conv1d(x, conv.weight, conv.bias, groups=conv.groups)

    def advance(self, s: int) -> None:
        """Count `s` more positions."""
        end = self.length + s
        if end > self.max_seq_len:
            raise ValueError(f"cache overflow: {end} positions > max_seq_len {self.max_seq_len}")
        self.length = end

    def commit(self, valid: torch.Tensor) -> None:
        """Record which of the positions just appended are real tokens."""
        start = self.length - valid.shape[1]
        self.valid[:, start : self.length] = valid
        self.next_pos += valid.sum(dim=1)


class ShortConv(nn.Module):
    """LFM2's gated short convolution: in_proj to (B, C, x), a causal depthwise
    convolution of B·x, times C, out_proj. Parameter names are Hugging Face's."""

    def __init__(self, dim: int, kernel: int, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1, bias=bias)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.conv.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)
        for part in (self.in_proj, self.conv, self.out_proj):
            if part.bias is not None:
                nn.init.zeros_(part.bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: ConvCache | None = None,  # if KV_CACHE
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, dim); `padding` (B, S), False at padding (left-padded prompts): the
        convolution sees zeros there, as a row alone sees before its first token."""
        s = x.shape[1]
        b, c, u = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)  # (B, dim, S) each
        bu = b * u
        if padding is not None:
            bu = bu * padding[:, None, :].to(bu.dtype)
        if KV_CACHE and cache is not None:
            u = cache.convolve(bu, self.conv)
            cache.advance(s)
        else:
            u = self.conv(bu)[:, :, :s]  # causal: the left padding only
        return self.out_proj((c * u).transpose(1, 2))
