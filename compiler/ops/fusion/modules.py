"""Vision-language fusion: gated cross-attention, Mixture-of-Transformers routing,
MoMa expert-choice experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.modules import DocumentMask, KVCache
from ..mlp.modules import SwiGLU
from ..moe.modules import GroupedExperts
from ..norm.modules import RMSNorm
from ..rope.modules import apply_rope

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with KV caches
QK_NORM = True  # feature: some attention has a per-head qk-norm
ROPE = True  # feature: some attention has rotary positions
DOCUMENT_SPANS = True  # feature: packed documents attend span by span (DocumentMask)


class CrossAttentionBlock(nn.Module):
    """Gated cross-attention: text queries, image keys and values (no positions, no
    causal mask), then a gated MLP. The output projections (o_proj, down_proj) start
    at zero, so the block starts as the identity and the decoder's text behaviour is
    untouched; the tanh gates start open (tanh(1)), so the projections get gradient
    from the first step. (Gates at tanh(0) with random projections, as in Flamingo,
    leave the gates' gradient a coin flip until the block's features are useful:
    on a small task the text learns the captions first and the image never gets in.)"""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.attention, name, nn.Linear(dim, dim, bias=False))
        self.attention_gate = nn.Parameter(torch.empty(1))
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.mlp_gate = nn.Parameter(torch.empty(1))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.mlp_norm.init_weights()
        for name in ("q_proj", "k_proj", "v_proj"):
            nn.init.normal_(getattr(self.attention, name).weight, mean=0.0, std=std)
        nn.init.zeros_(self.attention.o_proj.weight)
        self.mlp.init_weights(std, out_std)
        nn.init.zeros_(self.mlp.down_proj.weight)
        nn.init.ones_(self.attention_gate)
        nn.init.ones_(self.mlp_gate)

    def forward(
        self, x: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, S, dim) text, image (B, N, dim), image_mask (B, N) True for real tokens."""
        b, s, _ = x.shape
        att = self.attention
        q = att.q_proj(self.attention_norm(x)).view(b, s, self.heads, -1).transpose(1, 2)
        k = att.k_proj(image).view(b, image.shape[1], self.heads, -1).transpose(1, 2)
        v = att.v_proj(image).view(b, image.shape[1], self.heads, -1).transpose(1, 2)
        mask = None
        if image_mask is not None:
            # a row without any image attends to nothing (unmasked here, zeroed below)
            has_image = image_mask.any(dim=-1)
            mask = (image_mask | ~has_image[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if image_mask is not None:
            out = out * has_image[:, None, None, None]
        x = x + self.attention_gate.tanh() * att.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp_gate.tanh() * self.mlp(self.mlp_norm(x))


def route(
    parts: nn.ModuleDict,
    x: torch.Tensor,
    modality: dict[str, torch.Tensor],
    attr: str | None = None,
) -> torch.Tensor:
    """Each token (B, S, d) through its modality's copy of a component (or of the
    copy's submodule `attr`)."""
    out = None
    for name, selected in modality.items():  # no test of `selected`: torch.compile traces
        part = parts[name] if attr is None else getattr(parts[name], attr)
        y = part(x[selected][None])[0]  # (tokens of this modality, d_out)
        if out is None:
            out = x.new_zeros(*x.shape[:-1], y.shape[-1])
        out[selected] = y.to(out.dtype)
    return out


def mot_attention(
    parts: nn.ModuleDict,
    x: torch.Tensor,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    mask: torch.Tensor | DocumentMask | None,
    kv_cache: KVCache | None,  # if KV_CACHE
    modality: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Attention with per-modality q/k/v/o projections (and qk-norms), and one
    softmax over the whole sequence (every modality attends to every earlier token)."""
    b, s, _ = x.shape
    head_dim = next(iter(parts.values())).head_dim
    q, k, v = route_qkv(parts, x, modality)
    q, k, v = (t.view(b, s, -1, head_dim) for t in (q, k, v))  # (B, S, heads, hd)
    if QK_NORM:
        for name, selected in modality.items():
            part = parts[name]
            if part.q_norm is not None:
                q[selected], k[selected] = part.q_norm(q[selected]), part.k_norm(k[selected])
    if ROPE:
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, hd)
    if KV_CACHE and kv_cache is not None:
        k, v = kv_cache.update(k, v)
    if DOCUMENT_SPANS and isinstance(mask, DocumentMask):  # packed documents (training)
        out = mask.attend(q, k, v)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )
    out = out.transpose(1, 2).reshape(b, s, -1)
    return route(parts, out, modality, "o_proj")


def route_qkv(
    parts: nn.ModuleDict, x: torch.Tensor, modality: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, S, ·) with each token projected by its modality's weights."""
    q = k = v = None
    for name, selected in modality.items():  # an empty selection costs nothing
        part, xs = parts[name], x[selected]
        qs, ks, vs = part.q_proj(xs), part.k_proj(xs), part.v_proj(xs)
        if q is None:
            q = x.new_zeros(*x.shape[:-1], qs.shape[-1])
            k = x.new_zeros(*x.shape[:-1], ks.shape[-1])
            v = x.new_zeros(*x.shape[:-1], vs.shape[-1])
        q[selected], k[selected], v[selected] = qs, ks, vs
    return q, k, v


class ExpertChoiceGroup(nn.Module):
    """One modality's experts. Expert choice: each expert takes the top
    ceil(capacity · N) of the N tokens it is offered (all of this modality in the
    batch), weighted by its sigmoid router score. A token's output depends on the
    other tokens of the batch — later ones included — so this is not causal."""

    def __init__(self, dim: int, hidden: int, experts: int, capacity: float) -> None:
        super().__init__()
        self.experts_count, self.capacity = experts, capacity
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = GroupedExperts(dim, hidden, experts)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.experts.gate_proj, mean=0.0, std=std)
        nn.init.normal_(self.experts.up_proj, mean=0.0, std=std)
        nn.init.normal_(self.experts.down_proj, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, dim): every token of this modality in the batch."""
        n = x.shape[0]
        take = min(n, math.ceil(self.capacity * n))
        scores = torch.sigmoid(self.router(x).float())  # (N, E)
        gate, token = scores.topk(take, dim=0)  # (take, E): each expert's chosen tokens
        token, gate = token.t().reshape(-1), gate.t().reshape(-1)  # grouped by expert
        counts = torch.full((self.experts_count,), take, device=x.device)
        routed = self.experts(x[token], counts) * gate[:, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, routed)


class MoMaFFN(nn.Module):
    """MoMa feed-forward: one ExpertChoiceGroup per modality (by modality_ids)."""

    def __init__(
        self, dim: int, hidden: int, experts: int, capacity: float, modalities: tuple[str, ...]
    ) -> None:
        super().__init__()
        self.modalities = modalities
        for name in modalities:
            self.add_module(name, ExpertChoiceGroup(dim, hidden, experts, capacity))

    def init_weights(self, std: float, out_std: float) -> None:
        for name in self.modalities:
            getattr(self, name).init_weights(std, out_std)

    def forward(self, x: torch.Tensor, modality: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros_like(x)
        for name, selected in modality.items():
            out[selected] = getattr(self, name)(x[selected])
        return out
