"""The Mamba-2 (SSD) sequence mixer: a chunked scan in plain PyTorch, and its state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..short_conv.modules import ConvCache

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with caches


class Mamba2Cache(ConvCache):
    """The decoding state of one Mamba-2 layer: the last `conv - 1` inputs of its
    convolution (over x, B and C) and its SSM state per head, a fixed size per
    sequence whatever its length."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        heads: int,
        head_dim: int,
        state: int,
        groups: int,
        conv: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        channels = heads * head_dim + 2 * groups * state
        super().__init__(batch_size, max_seq_len, channels, conv, dtype=dtype, device=device)
        shape = (batch_size, heads, head_dim, state)
        self.ssm_state = torch.zeros(shape, dtype=dtype, device=device)


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) → (..., T, T): entry [i, j] = x[j+1] + … + x[i] for j ≤ i, -inf above."""
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~causal, -torch.inf)


def ssd_scan(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    chunk: int,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan h_t = exp(log_decay_t) h_{t-1} + x_t b_tᵀ, y_t = h_t c_t, chunk by
    chunk: quadratic (attention-like) within a chunk, recurrent across chunks.

    x (B, S, H, P), log_decay (B, S, H), b and c (B, S, H, N), initial (B, H, P, N)
    → y (B, S, H, P) and the final state (B, H, P, N).
    """
    bsz, s, h, p = x.shape
    chunk = min(chunk, s)
    pad = -s % chunk  # zero inputs and no decay at the end leave the state as it is
    if pad:
        x, log_decay, b, c = (
            F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, log_decay, b, c)
        )
    n = x.shape[1] // chunk
    x = x.reshape(bsz, n, chunk, h, p)
    b, c = b.reshape(bsz, n, chunk, h, -1), c.reshape(bsz, n, chunk, h, -1)
    a = log_decay.reshape(bsz, n, chunk, h).permute(0, 3, 1, 2)  # (B, H, n, l)
    a_cum = a.cumsum(dim=-1)
    # within a chunk: y_t = Σ_{s ≤ t} exp(a_{s+1} + … + a_t) (c_t·b_s) x_s
    decay = torch.exp(segment_sum(a))  # (B, H, n, l, l)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", c, b, decay, x)
    # each chunk's contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, n, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, to_end, x)
    if initial is None:
        initial = torch.zeros_like(states[:, :1])
    else:
        initial = initial[:, None].to(states.dtype)
    states = torch.cat([initial, states], dim=1)  # (B, n + 1, H, P, N)
    # the states entering each chunk, carried across chunks
    across = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # (B, H, n + 1, n + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    states, final = states[:, :-1], states[:, -1]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", c, states, torch.exp(a_cum))
    return y.reshape(bsz, n * chunk, h, p)[:, :s], final


class GatedRMSNorm(nn.Module):
    """RMSNorm of y · silu(z) over groups of channels, in fp32 (Mamba-2's output norm)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.float() * F.silu(z.float())
        grouped = y.view(*y.shape[:-1], self.groups, -1)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.view(y.shape).to(z.dtype)


class Mamba2(nn.Module):
    """Mamba-2: in_proj to the gate z, the convolved x, B, C and a time step per head;
    a causal depthwise convolution and SiLU over (x, B, C); the SSD scan with a
    scalar decay exp(dt·A) per head; D·x; the gated RMSNorm; out_proj. Parameter
    names are Hugging Face's (Mamba2Mixer)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        state: int,
        groups: int,
        conv: int,
        chunk: int,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.inner, self.heads, self.head_dim = inner, heads, head_dim
        self.state, self.groups, self.chunk = state, groups, chunk
        self.conv_dim = inner + 2 * groups * state
        self.in_proj = nn.Linear(dim, inner + self.conv_dim + heads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            conv,
            groups=self.conv_dim,
            padding=conv - 1,
            bias=conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.empty(heads))
        self.norm = GatedRMSNorm(inner, groups, norm_eps)
        self.out_proj = nn.Linear(inner, dim, bias=bias)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.conv1d.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)
        for part in (self.in_proj, self.conv1d, self.out_proj):
            if part.bias is not None:
                nn.init.zeros_(part.bias)
        with torch.no_grad():
            # time steps log-uniform in [1e-3, 1e-1], stored as softplus⁻¹ (Mamba's init)
            dt = torch.exp(
                torch.rand(self.heads, device=self.D.device) * (math.log(0.1) - math.log(1e-3))
                + math.log(1e-3)
            )
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_log.copy_(torch.log(torch.arange(1, self.heads + 1, device=self.D.device)))
        nn.init.ones_(self.D)
        self.norm.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        cache: Mamba2Cache | None = None,  # if KV_CACHE
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, dim); `padding` (B, S), False at padding (left-padded prompts): its
        positions neither feed the convolution nor move the state, so that each row
        computes what it would alone."""
        bsz, s, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        if padding is not None:
            xbc = xbc * padding[..., None].to(xbc.dtype)
        xbc = xbc.transpose(1, 2)  # (B, conv_dim, S)
        if KV_CACHE and cache is not None:  # the convolution continues the cached inputs
            xbc = cache.convolve(xbc, self.conv1d)
        else:
            xbc = self.conv1d(xbc)[:, :, :s]  # causal: the left padding only
        xbc = F.silu(xbc).transpose(1, 2)
        if padding is not None:  # no input at padding (the convolution's bias is one)
            xbc = xbc * padding[..., None].to(xbc.dtype)
        u, b, c = xbc.split([self.inner, self.groups * self.state, self.groups * self.state], -1)
        u = u.reshape(bsz, s, self.heads, self.head_dim).float()  # (B, S, H, P)
        # B and C are shared by the heads of a group
        per_group = self.heads // self.groups
        b = b.reshape(bsz, s, self.groups, self.state).float().repeat_interleave(per_group, 2)
        c = c.reshape(bsz, s, self.groups, self.state).float().repeat_interleave(per_group, 2)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, S, H)
        if padding is not None:  # no time passes at padding: the state stays as it is
            dt = dt * padding[..., None]
        a = -torch.exp(self.A_log.float())  # (H,)
        initial = None
        if KV_CACHE and cache is not None:  # the scan continues the cached state
            initial = cache.ssm_state
        y, final = ssd_scan(u * dt[..., None], dt * a, b, c, self.chunk, initial)
        if KV_CACHE and cache is not None:
            cache.ssm_state.copy_(final)
            cache.advance(s)
        y = y + u * self.D.float()[:, None]  # (B, S, H, P)
        y = self.norm(y.reshape(bsz, s, self.inner), z)
        return self.out_proj(y.to(x.dtype))
