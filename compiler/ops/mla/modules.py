"""Multi-head latent attention and its cache of compressed latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.modules import DocumentMask, KVCache
from ..norm.modules import RMSNorm
from ..rope.modules import apply_rope

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with KV caches
LATENT_Q = True  # feature: some MLA compresses its queries (q_lora_rank > 0)
DIRECT_Q = True  # feature: some MLA projects its queries directly (q_lora_rank = 0)
INTERLEAVED_ROPE = True  # feature: some MLA rotates channel pairs (0, 1), (2, 3), ...
HALF_SPLIT_ROPE = True  # feature: some MLA rotates the halves (0, d/2), (1, d/2 + 1), ...
LATENT_SCALE = True  # feature: some MLA scales its scores by other than 1/sqrt(qk_head_dim)
DOCUMENT_SPANS = True  # feature: packed documents attend span by span (DocumentMask)


class LatentCache(KVCache):
    """What multi-head latent attention caches per token: the normalised key/value
    latent (in `k`, (B, 1, S, kv_lora_rank)) and the rotated key channels every head
    shares (in `v`, (B, 1, S, qk_rope_head_dim)): kv_lora_rank + qk_rope_head_dim
    values instead of heads · (qk_head_dim + v_head_dim)."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch_size, max_seq_len, 1, kv_lora_rank, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, 1, max_seq_len, rope_dim, dtype=dtype, device=device)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (0, 1), (2, 3), ... of (B, S, H, d) by the (B or 1, S, d)
    tables, in fp32; the rotated evens come out first, then the odds (queries and keys
    alike, so their products are those of the interleaved layout)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[:, :, None, :half], sin[:, :, None, :half]
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1).type_as(x)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 / V3).

    Keys and values come from a normalised latent of kv_lora_rank channels per
    token, expanded per head by kv_b_proj into qk_nope_head_dim key and v_head_dim
    value channels; qk_rope_head_dim more key channels, rotated, are shared by all
    heads. Queries (optionally through a q_lora_rank bottleneck) have the same
    qk_nope_head_dim + qk_rope_head_dim channels. The cache holds the latent and
    the rotated key: the expansion is recomputed from it at each step.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int = 0,  # if LATENT_Q
        rope_interleave: bool = True,  # if INTERLEAVED_ROPE and HALF_SPLIT_ROPE
        bias: bool = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,  # if LATENT_SCALE
    ) -> None:
        super().__init__()
        self.kv_lora_rank, self.v_head_dim = kv_lora_rank, v_head_dim
        if LATENT_SCALE:
            self.scale = scale  # None: 1/sqrt(qk_head_dim)
        self.nope_dim, self.rope_dim = qk_nope_head_dim, qk_rope_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if INTERLEAVED_ROPE and HALF_SPLIT_ROPE:
            self.rope_interleave = rope_interleave
        if LATENT_Q and DIRECT_Q:
            self.q_lora_rank = q_lora_rank
        if LATENT_Q and (not DIRECT_Q or q_lora_rank):
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, heads * qk_head_dim, bias=False)
        if DIRECT_Q and (not LATENT_Q or not q_lora_rank):
            self.q_proj = nn.Linear(dim, heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps)
        kv_b_width = heads * (qk_nope_head_dim + v_head_dim)  # per head: key, then value
        self.kv_b_proj = nn.Linear(kv_lora_rank, kv_b_width, bias=False)
        self.o_proj = nn.Linear(heads * v_head_dim, dim, bias=bias)

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.kv_a_proj_with_mqa, self.kv_b_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        if LATENT_Q and (not DIRECT_Q or self.q_lora_rank):
            nn.init.normal_(self.q_a_proj.weight, mean=0.0, std=std)
            nn.init.normal_(self.q_b_proj.weight, mean=0.0, std=std)
            self.q_a_layernorm.init_weights()
            if self.q_a_proj.bias is not None:
                nn.init.zeros_(self.q_a_proj.bias)
        if DIRECT_Q and (not LATENT_Q or not self.q_lora_rank):
            nn.init.normal_(self.q_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std)
        for proj in (self.kv_a_proj_with_mqa, self.o_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.kv_a_layernorm.init_weights()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the (B, S, H, qk_rope_head_dim) channels that carry positions."""
        if INTERLEAVED_ROPE and (not HALF_SPLIT_ROPE or self.rope_interleave):
            return apply_rope_interleaved(x, cos, sin)
        else:
            return apply_rope(x, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        mask: torch.Tensor | DocumentMask | None,
        kv_cache: LatentCache | None = None,  # if KV_CACHE
    ) -> torch.Tensor:
        b, s, _ = x.shape
        if LATENT_Q and (not DIRECT_Q or self.q_lora_rank):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        # -1 heads: under tensor parallelism a rank holds a slice of the heads
        q = q.view(b, s, -1, self.nope_dim + self.rope_dim)  # (B, S, H, qk_head_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)  # (B, S, kv_lora_rank + qk_rope_head_dim)
        latent, k_rope = compressed.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, S, kv_lora_rank)
        q_rope = self.rotate(q_rope, rope_cos, rope_sin)
        k_rope = self.rotate(k_rope[:, :, None], rope_cos, rope_sin).transpose(1, 2)  # (B, 1, S, r)
        if KV_CACHE and kv_cache is not None:
            latent, k_rope = kv_cache.update(latent, k_rope)  # every cached position so far
        t = latent.shape[2]  # key positions
        kv = self.kv_b_proj(latent[:, 0]).view(b, t, -1, self.nope_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.nope_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)  # (B, H, T, qk)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, S, qk_head_dim)
        if DOCUMENT_SPANS and isinstance(mask, DocumentMask):  # packed documents (training)
            if LATENT_SCALE and self.scale is not None:  # the same scores
                q = q * (self.scale * (self.nope_dim + self.rope_dim) ** 0.5)
            out = mask.attend(q, k, v)
        else:
            if LATENT_SCALE:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
                )
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))  # (B, H, S, v) → (B, S, dim)
