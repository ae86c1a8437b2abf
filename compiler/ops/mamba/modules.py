"""The Mamba (selective state-space) sequence mixer and its decoding state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..norm.modules import RMSNorm
from ..short_conv.modules import ConvCache

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with caches
DT_NORMS = True  # feature: some mixer normalises dt, B and C (Jamba)


class MambaCache(ConvCache):
    """The decoding state of one Mamba layer: the last `conv - 1` inputs of its
    convolution (ConvCache) and its SSM state, a fixed size per sequence whatever
    its length."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        inner: int,
        conv: int,
        state: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(batch_size, max_seq_len, inner, conv, dtype=dtype, device=device)
        self.ssm_state = torch.zeros(batch_size, inner, state, dtype=dtype, device=device)


class Mamba(nn.Module):
    """Mamba-1 selective scan: in_proj → causal depthwise conv → SiLU → x_proj to
    (dt, B, C) → softplus(dt_proj(dt)) → h_t = exp(dt·A) h_{t-1} + dt·B x_t,
    y_t = C·h_t + D x_t → y · silu(z) → out_proj. Parameter names are Hugging Face's."""

    def __init__(
        self,
        dim: int,
        state: int,
        conv: int,
        expand: int,
        inner: int | None = None,  # default: expand * dim
        dt_rank: int | None = None,  # default: ceil(dim / 16)
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float | None = None,  # if DT_NORMS
    ) -> None:
        super().__init__()
        inner = inner or expand * dim
        dt_rank = dt_rank or math.ceil(dim / 16)
        self.inner, self.state, self.conv, self.dt_rank = inner, state, conv, dt_rank
        self.in_proj = nn.Linear(dim, 2 * inner, bias=bias)
        self.conv1d = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        if DT_NORMS:
            has_norms = norm_eps is not None
            self.dt_layernorm = RMSNorm(dt_rank, norm_eps) if has_norms else None
            self.b_layernorm = RMSNorm(state, norm_eps) if has_norms else None
            self.c_layernorm = RMSNorm(state, norm_eps) if has_norms else None

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.in_proj, self.x_proj, self.dt_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)
        nn.init.normal_(self.conv1d.weight, mean=0.0, std=std)
        for proj in (self.in_proj, self.conv1d, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        with torch.no_grad():
            # time steps log-uniform in [1e-3, 1e-1], stored as softplus⁻¹ (Mamba's init)
            dt = torch.exp(
                torch.rand(self.inner, device=self.D.device) * (math.log(0.1) - math.log(1e-3))
                + math.log(1e-3)
            )
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            a = torch.arange(1, self.state + 1, dtype=torch.float32, device=self.D.device)
            self.A_log.copy_(torch.log(a).expand(self.inner, -1))
        nn.init.ones_(self.D)
        if DT_NORMS and self.dt_layernorm is not None:
            for norm in (self.dt_layernorm, self.b_layernorm, self.c_layernorm):
                norm.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        cache: MambaCache | None = None,  # if KV_CACHE
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, dim); `padding` (B, S), False at padding (left-padded prompts): its
        positions neither feed the convolution nor move the state, so that each row
        computes what it would alone."""
        s = x.shape[1]
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, inner, S) each
        if padding is not None:
            u = u * padding[:, None, :].to(u.dtype)
        if KV_CACHE and cache is not None:  # the convolution continues the cached inputs
            u = cache.convolve(u, self.conv1d)
        else:
            u = self.conv1d(u)[:, :, :s]  # causal: the left padding only
        u = F.silu(u).transpose(1, 2)  # (B, S, inner)
        if padding is not None:  # no input at padding (the convolution's bias is one)
            u = u * padding[..., None].to(u.dtype)
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.state, self.state], dim=-1)
        if DT_NORMS and self.dt_layernorm is not None:
            dt, b, c = self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, S, inner)
        if padding is not None:  # no time passes at padding: the state stays as it is
            dt = dt * padding[..., None]
        a = -torch.exp(self.A_log.float())  # (inner, state)
        decay = torch.exp(dt[..., None] * a)  # (B, S, inner, state)
        drive = (dt * u.float())[..., None] * b.float()[:, :, None, :]  # (B, S, inner, state)
        h = torch.zeros_like(decay[:, 0])
        if KV_CACHE and cache is not None:
            h = cache.ssm_state.float()
        states = []
        for t in range(s):  # the recurrence, one position at a time
            h = decay[:, t] * h + drive[:, t]
            states.append(h)
        if KV_CACHE and cache is not None:
            cache.ssm_state.copy_(h)
            cache.advance(s)
        y = torch.einsum("bsin,bsn->bsi", torch.stack(states, dim=1), c.float())
        y = y + u.float() * self.D.float()  # (B, S, inner)
        y = y * F.silu(z.transpose(1, 2).float())
        return self.out_proj(y.to(x.dtype))
