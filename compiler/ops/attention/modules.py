"""Grouped-query self-attention and its KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..norm.modules import RMSNorm
from ..rope.modules import apply_rope

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with KV caches
QK_NORM = True  # feature: some attention has a per-head qk-norm
ROPE = True  # feature: some attention has rotary positions
NO_ROPE = True  # feature: some attention has no positions
ZERO_INIT = True  # feature: some attention starts as the identity (`zero_init = true`)


class KVCache:
    """Keys (after RoPE) and values of one layer, pre-allocated for decoding.

    `length` slots are filled, the same for every row; `valid` marks the slots
    holding real tokens (left padding does not) and `next_pos` is each row's
    next RoPE position.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_seq_len = max_seq_len

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, KV, S, hd) keys and values; return everything cached so far."""
        end = self.length + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_seq_len {self.max_seq_len}")
        self.k[:, :, self.length : end] = k.to(self.k.dtype)
        self.v[:, :, self.length : end] = v.to(self.v.dtype)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def commit(self, valid: torch.Tensor) -> None:
        """Record which of the positions just appended are real tokens."""
        start = self.length - valid.shape[1]
        self.valid[:, start : self.length] = valid
        self.next_pos += valid.sum(dim=1)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads."""

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,  # default: heads
        head_dim: int | None = None,  # default: dim // heads
        causal: bool = True,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm_eps: float | None = None,  # if QK_NORM
        use_rope: bool = True,  # if ROPE and NO_ROPE
        zero_init: bool = False,  # if ZERO_INIT
    ) -> None:
        super().__init__()
        kv_heads, head_dim = kv_heads or heads, head_dim or dim // heads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.causal = causal
        if ROPE and NO_ROPE:
            self.use_rope = use_rope
        if ZERO_INIT:
            self.zero_init = zero_init
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=out_bias)
        if QK_NORM:
            has_qk_norm = qk_norm_eps is not None
            self.q_norm = RMSNorm(head_dim, qk_norm_eps) if has_qk_norm else None
            self.k_norm = RMSNorm(head_dim, qk_norm_eps) if has_qk_norm else None

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.o_proj.weight)
        else:
            nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if QK_NORM and self.q_norm is not None:
            self.q_norm.init_weights()
            self.k_norm.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None,
        rope_sin: torch.Tensor | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,  # if KV_CACHE
    ) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds a slice of the heads
        q = self.q_proj(x).view(b, s, -1, self.head_dim)  # (B, S, H, hd)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)  # (B, S, KV, hd)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if QK_NORM and self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ROPE and (not NO_ROPE or self.use_rope):
            q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, hd)
        if KV_CACHE and kv_cache is not None:
            k, v = kv_cache.update(k, v)  # all cached keys and values so far
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # (B, H, S, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
