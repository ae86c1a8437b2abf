"""Grouped-query self-attention and its KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..norm.modules import LayerNorm, RMSNorm
from ..rope.modules import apply_rope

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with KV caches
QK_NORM = True  # feature: some attention has a per-head qk-norm
ROPE = True  # feature: some attention has rotary positions
NO_ROPE = True  # feature: some attention has no positions
ZERO_INIT = True  # feature: some attention starts as the identity (`zero_init = true`)
QUERY_SCALE = True  # feature: some attention scales its scores by other than 1/sqrt(head_dim)
ATTN_SOFTCAP = True  # feature: some attention soft-caps its scores (Gemma 2)
UNIT_OFFSET = True  # feature: some RMSNorm scales by 1 + weight (a qk-norm here)
LOCAL_ROPE = True  # feature: the rope has a second base for local layers (Gemma 3)
CLIP_QKV = True  # feature: some attention clamps q, k and v (`clip_qkv`, OLMo's)
QK_NORM_PROJECTION = True  # feature: some qk-norm spans the whole projection (OLMo 2)
SINKS = True  # feature: some attention has learned per-head sink logits
OUTPUT_GATE = True  # feature: some attention gates its output per channel (Qwen3-Next)
LAYER_QK_NORM = True  # feature: some qk-norm is a LayerNorm with a bias (Persimmon)
OUT_NORM = True  # feature: some attention norms its heads' output before o_proj (BitNet)
LATE_QK_NORM = True  # feature: some qk-norm follows RoPE (`qk_norm_after_rope`, HunYuan)
DOCUMENT_SPANS = True  # feature: packed documents attend span by span (DocumentMask)
ATTN_BIAS = True  # feature: some attention has biases on its projections


class KVCache:
    """Keys (after RoPE) and values of one layer, pre-allocated for decoding: `length`
    slots are filled in every row, `valid` marks those holding real tokens (not left
    padding), `next_pos` is each row's next RoPE position."""

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


class DocumentMask:
    """Attention confined to each document of a packed batch, in training (no KV
    cache, no padding): what a (B, 1, S, S) boolean mask of `doc_ids` would say,
    without building one or computing the scores it masks out.

    doc_ids (B, S) number the documents of each row; a document's tokens are
    contiguous. Within a document attention is causal (or not: `causal`), and
    reaches at most `window` keys back when `window` > 0. On a GPU (`flex`) the
    mask is a FlexAttention BlockMask: blocks outside every document are skipped.
    Elsewhere each document's span runs through SDPA on its own (rows that cut
    their documents at the same places share the calls).
    """

    _compiled_flex = None  # torch.compile(flex_attention), made on first use

    def __init__(
        self,
        doc_ids: torch.Tensor,
        causal: bool = True,
        window: int = 0,
        flex: bool | None = None,
    ) -> None:
        self.causal, self.window = causal, window
        if ATTN_SOFTCAP or SINKS:  # kernels that score explicitly take dense() instead
            self.doc_ids = doc_ids
        b, s = doc_ids.shape
        self.block_mask = None
        if doc_ids.is_cuda if flex is None else flex:
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document(batch, head, q, k):
                keep = doc_ids[batch, q] == doc_ids[batch, k]
                if causal:
                    keep = keep & (k <= q)
                if window:
                    keep = keep & (q - k < window)
                return keep

            self.block_mask = create_block_mask(same_document, b, None, s, s, device=doc_ids.device)
            return
        # (first row, end row, spans): consecutive rows with the same documents
        self.groups: list[tuple[int, int, list[tuple[int, int]]]] = []
        if doc_ids.is_meta:  # shapes only (a meta forward): one document per row will do
            self.groups.append((0, b, [(0, s)]))
            return
        first = torch.ones_like(doc_ids, dtype=torch.bool)
        first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        rows, starts = first.nonzero(as_tuple=True)
        cuts: list[list[int]] = [[] for _ in range(b)]
        for row, start in zip(rows.tolist(), starts.tolist(), strict=True):
            cuts[row].append(start)
        for row, starts_of_row in enumerate(cuts):
            spans = list(zip(starts_of_row, [*starts_of_row[1:], s], strict=True))
            if self.groups and self.groups[-1][2] == spans:
                self.groups[-1] = (self.groups[-1][0], row + 1, spans)
            else:
                self.groups.append((row, row + 1, spans))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA of (B, heads, S, hd) queries, keys and values within documents."""
        gqa = q.shape[1] != k.shape[1]
        if self.block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            if q.is_cuda and DocumentMask._compiled_flex is None:
                DocumentMask._compiled_flex = torch.compile(flex_attention)
            flex = DocumentMask._compiled_flex if q.is_cuda else flex_attention
            return flex(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)
        rows = []
        for row, end_row, spans in self.groups:
            parts = []
            for start, end in spans:
                mask = None
                if self.window and end - start > self.window:
                    pos = torch.arange(end - start, device=q.device)
                    mask = pos[:, None] - pos[None, :] < self.window
                    if self.causal:
                        mask = mask & (pos[None, :] <= pos[:, None])
                out = F.scaled_dot_product_attention(
                    q[row:end_row, :, start:end],
                    k[row:end_row, :, start:end],
                    v[row:end_row, :, start:end],
                    attn_mask=mask,
                    is_causal=self.causal and mask is None,
                    enable_gqa=gqa,
                )
                parts.append(out)
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def dense_document_mask(mask: DocumentMask) -> torch.Tensor:
    """The (B, 1, S, S) boolean mask a DocumentMask stands for, True where a query may
    attend a key: for the attention that computes its scores itself (soft-capped
    scores, sinks), which holds (B, H, S, S) scores anyway."""
    doc_ids = mask.doc_ids
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    keep = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    if mask.causal:
        keep = keep & (pos[None, :] <= pos[:, None])
    if mask.window:
        keep = keep & (pos[:, None] - pos[None, :] < mask.window)
    return keep


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    softcap: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of (B, H, S, hd) queries over (B, KV, T, hd) keys and values whose
    scores are soft-capped, softcap · tanh(scores / softcap), before the mask and the
    fp32 softmax (SDPA has no hook for it). `mask`: (B, 1, S, T) booleans, True where
    a query may attend a key; None for causal (or full) attention."""
    if DOCUMENT_SPANS and isinstance(mask, DocumentMask):  # packed documents (training)
        mask = dense_document_mask(mask)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, S, T)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None and causal:  # the last S of T positions are the queries
        s, t = scores.shape[-2:]
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class ProjectionRMSNorm(RMSNorm):
    """RMSNorm of (B, S, heads, head_dim) over all heads at once: OLMo 2's qk-norm,
    BitNet's norm of the heads' output (`out_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] * x.shape[-1] != self.dim:
            raise ValueError(
                f"this norm (qk_norm_over = projection, or out_norm) spans all {self.dim} "
                "channels of the heads at once, this "
                f"rank holds {x.shape[-2] * x.shape[-1]}: a plan that splits the heads "
                "(tensor parallelism) cannot apply it"
            )
        return super().forward(x.flatten(-2)).view_as(x)


def attend_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
    causal: bool,
    scale: float | None = None,  # if QUERY_SCALE
) -> torch.Tensor:
    """SDPA of (B, heads, S, hd) queries over (B, KV, T, hd) keys where each head's
    softmax also weighs a learned sink logit (gpt-oss): one more key of zeros, scored
    by the sink, with a zero value, so the real keys' weights sum to less than one."""
    b, h, s, _ = q.shape
    t = k.shape[2]
    if mask is None:  # the queries are the last s of t positions
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device)
        mask = mask.tril(t - s) if causal else mask
    scores = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))  # (B or 1, 1, S, T) or (S, T)
    scores = torch.cat(
        [scores.expand(b, h, s, t), sinks.to(q.dtype)[None, :, None, None].expand(b, -1, s, 1)],
        dim=-1,
    )  # (B, H, S, T + 1)
    zeros = k.new_zeros(b, k.shape[1], 1, k.shape[3])
    k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=scores,
        scale=scale,  # if QUERY_SCALE
        enable_gqa=h != k.shape[1],
    )


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
        scale: float | None = None,  # if QUERY_SCALE
        softcap: float = 0.0,  # if ATTN_SOFTCAP
        qk_norm_unit_offset: bool = False,  # if QK_NORM and UNIT_OFFSET
        local_rope: bool = False,  # if LOCAL_ROPE
        clip_qkv: float = 0.0,  # if CLIP_QKV
        qk_norm_projection: bool = False,  # if QK_NORM_PROJECTION
        sinks: bool = False,  # if SINKS
        output_gate: bool = False,  # if OUTPUT_GATE
        qk_norm_after_rope: bool = False,  # if LATE_QK_NORM
        out_norm_eps: float | None = None,  # if OUT_NORM
        qk_layernorm: bool = False,  # if LAYER_QK_NORM
    ) -> None:
        super().__init__()
        kv_heads, head_dim = kv_heads or heads, head_dim or dim // heads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.causal = causal
        if QUERY_SCALE:
            self.scale = scale  # None: 1/sqrt(head_dim)
        if ATTN_SOFTCAP:
            self.softcap = softcap
        if LOCAL_ROPE:
            self.local_rope = local_rope
        if ROPE and NO_ROPE:
            self.use_rope = use_rope
        if ZERO_INIT:
            self.zero_init = zero_init
        if CLIP_QKV:
            self.clip_qkv = clip_qkv
        if LATE_QK_NORM:
            self.qk_norm_after_rope = qk_norm_after_rope
        if OUTPUT_GATE:
            self.output_gate = output_gate
        if OUTPUT_GATE and output_gate:  # q_proj yields each head's query, then its gate
            self.q_proj = nn.Linear(dim, 2 * heads * head_dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=out_bias)
        if QK_NORM:
            has_qk_norm = qk_norm_eps is not None
            if UNIT_OFFSET:  # Gemma 3: the norms scale by 1 + weight
                offset = qk_norm_unit_offset
                self.q_norm = RMSNorm(head_dim, qk_norm_eps, offset) if has_qk_norm else None
                self.k_norm = RMSNorm(head_dim, qk_norm_eps, offset) if has_qk_norm else None
            else:
                self.q_norm = RMSNorm(head_dim, qk_norm_eps) if has_qk_norm else None
                self.k_norm = RMSNorm(head_dim, qk_norm_eps) if has_qk_norm else None
        if LAYER_QK_NORM and qk_layernorm:  # Persimmon: LayerNorms with biases, per head
            self.q_norm = LayerNorm(head_dim, qk_norm_eps)
            self.k_norm = LayerNorm(head_dim, qk_norm_eps)
        if QK_NORM_PROJECTION and qk_norm_projection:  # one norm over all the heads
            self.q_norm = ProjectionRMSNorm(heads * head_dim, qk_norm_eps)
            self.k_norm = ProjectionRMSNorm(kv_heads * head_dim, qk_norm_eps)
        if SINKS:
            self.sinks = nn.Parameter(torch.empty(heads)) if sinks else None
        if OUT_NORM:  # one RMSNorm over all the heads' output
            has_out_norm = out_norm_eps is not None
            self.out_norm = ProjectionRMSNorm(heads * head_dim, out_norm_eps) if has_out_norm else None

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.o_proj.weight)
        else:
            nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std)
        if ATTN_BIAS:
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        if QK_NORM and self.q_norm is not None:
            self.q_norm.init_weights()
            self.k_norm.init_weights()
        if SINKS and self.sinks is not None:
            nn.init.normal_(self.sinks, mean=0.0, std=std)
        if OUT_NORM and self.out_norm is not None:
            self.out_norm.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor | None,
        rope_sin: torch.Tensor | None,
        mask: torch.Tensor | DocumentMask | None,
        kv_cache: KVCache | None = None,  # if KV_CACHE
    ) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds a slice of the heads
        if OUTPUT_GATE and self.output_gate:  # each head's query, then its gate
            q, gate = self.q_proj(x).view(b, s, -1, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(b, s, -1)  # (B, S, H·hd)
        else:
            q = self.q_proj(x).view(b, s, -1, self.head_dim)  # (B, S, H, hd)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)  # (B, S, KV, hd)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if CLIP_QKV and self.clip_qkv:  # the projections clamped to ±clip_qkv
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if QK_NORM and self.q_norm is not None and not (LATE_QK_NORM and self.qk_norm_after_rope):
            q, k = self.q_norm(q), self.k_norm(k)
        if ROPE and (not NO_ROPE or self.use_rope):
            if LOCAL_ROPE:
                # the tables hold the global base's angles, then the local base's: our half
                half = rope_cos.shape[-1] // 2
                part = slice(half, None) if self.local_rope else slice(None, half)
                rope_cos, rope_sin = rope_cos[..., part], rope_sin[..., part]
            q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        if LATE_QK_NORM and self.qk_norm_after_rope:  # HunYuan: the qk-norm follows RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, hd)
        if KV_CACHE and kv_cache is not None:
            k, v = kv_cache.update(k, v)  # all cached keys and values so far
        if ATTN_SOFTCAP and self.softcap:
            # SDPA cannot soft-cap its scores
            out = softcapped_attention(
                q,
                k,
                v,
                mask,
                self.causal,
                self.softcap,
                self.scale,  # if QUERY_SCALE
            )
        else:
            if SINKS and self.sinks is not None:
                if DOCUMENT_SPANS and isinstance(mask, DocumentMask):  # packed documents (training)
                    mask = dense_document_mask(mask)
                out = attend_with_sinks(
                    q,
                    k,
                    v,
                    mask,
                    self.sinks,
                    self.causal,
                    self.scale,  # if QUERY_SCALE
                )
            else:
                if DOCUMENT_SPANS and isinstance(mask, DocumentMask):  # packed documents (training)
                    if QUERY_SCALE and self.scale is not None:  # the same scores
                        q = q * (self.scale * self.head_dim**0.5)
                    out = mask.attend(q, k, v)
                else:
                    out = F.scaled_dot_product_attention(
                        q,
                        k,
                        v,
                        attn_mask=mask,
                        is_causal=self.causal and mask is None,
                        scale=self.scale,  # if QUERY_SCALE
                        enable_gqa=q.shape[1] != k.shape[1],
                    )  # (B, H, S, hd)
        if OUT_NORM and self.out_norm is not None:  # BitNet's attn_sub_norm
            out = self.out_norm(out.transpose(1, 2)).transpose(1, 2)
        if OUTPUT_GATE and self.output_gate:  # each channel scaled by its gate
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1) * torch.sigmoid(gate))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
