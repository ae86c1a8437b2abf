"""The gated DeltaNet sequence mixer (Qwen3-Next's linear attention): a chunked delta
rule in plain PyTorch for training and prefill, its recurrent step for decoding, and
its state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..short_conv.modules import ConvCache

# Features: the generated model keeps a guarded branch only where its spec uses it.
KV_CACHE = True  # feature: the model decodes with caches


class DeltaNetCache(ConvCache):
    """The decoding state of one gated DeltaNet layer: the last `conv - 1` inputs of its
    convolution (over q, k and v) and the state of every value head, a (qk_head_dim,
    v_head_dim) matrix: a fixed size per sequence whatever its length."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        qk_heads: int,
        v_heads: int,
        qk_head_dim: int,
        v_head_dim: int,
        conv: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        channels = 2 * qk_heads * qk_head_dim + v_heads * v_head_dim
        super().__init__(batch_size, max_seq_len, channels, conv, dtype=dtype, device=device)
        shape = (batch_size, v_heads, qk_head_dim, v_head_dim)
        self.recurrent_state = torch.zeros(shape, dtype=dtype, device=device)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(Σ x² + eps) over the last dimension (the query and key norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    chunk: int,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule S_t = exp(g_t) S_{t-1} (I - β_t k_t k_tᵀ) + β_t k_t v_tᵀ,
    o_t = S_tᵀ q_t, chunk by chunk: within a chunk the updates are solved at once (a unit
    lower-triangular system, the WY form), across chunks the state is carried.

    q, k (B, S, H, Dk), v (B, S, H, Dv), log_decay g and beta (B, S, H), initial
    (B, H, Dk, Dv) → o (B, S, H, Dv) and the final state (B, H, Dk, Dv), in fp32.
    """
    b, s, h, dk = k.shape
    chunk = min(chunk, s)
    pad = -s % chunk  # no key, no write and no decay at the end leave the state as it is
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        log_decay, beta = (F.pad(t, (0, 0, 0, pad)) for t in (log_decay, beta))
    n = q.shape[1] // chunk
    # (B, H, n, L, D) and (B, H, n, L)
    q, k, v = (t.reshape(b, n, chunk, h, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    g, beta = (t.reshape(b, n, chunk, h).permute(0, 3, 1, 2) for t in (log_decay, beta))
    g = g.cumsum(dim=-1)  # the log decay from the chunk's start to each position
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(g_i - g_j) for j ≤ i, 0 above
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, -torch.inf).exp()
    # within a chunk: the writes u, and the reads w of the state entering it, solve
    # (I + strictly_lower(β k kᵀ ⊙ decay)) [u w] = [β v, β k exp(g)]
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(
        system, k_beta * g.exp()[..., None], upper=False, unitriangular=True
    )
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, L, L)
    q_in = q * g.exp()[..., None]  # what each query reads of the state entering the chunk
    k_out = k * (g[..., -1:] - g).exp()[..., None]  # each key's write, decayed to the end
    chunk_decay = g[..., -1].exp()[..., None, None]  # (B, H, n, 1, 1)
    if initial is None:
        state = q.new_zeros(b, h, dk, v.shape[-1])
    else:
        state = initial.to(q.dtype)
    out = []
    for c in range(n):
        v_new = u[:, :, c] - w[:, :, c] @ state  # the part the state does not predict
        out.append(q_in[:, :, c] @ state + scores[:, :, c] @ v_new)
        state = state * chunk_decay[:, :, c] + k_out[:, :, c].transpose(-1, -2) @ v_new
    o = torch.stack(out, dim=2)  # (B, H, n, L, Dv)
    return o.permute(0, 2, 3, 1, 4).reshape(b, n * chunk, h, -1)[:, :s], state


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule one position at a time (decoding): shapes as gated_delta_chunked,
    `state` the state before the first position."""
    out = []
    for t in range(q.shape[1]):
        state = state * log_decay[:, t].exp()[..., None, None]  # (B, H, Dk, Dv)
        predicted = (state * k[:, t, :, :, None]).sum(dim=-2)  # Sᵀ k: (B, H, Dv)
        delta = (v[:, t] - predicted) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        out.append((state * q[:, t, :, :, None]).sum(dim=-2))
    return torch.stack(out, dim=1), state


class GatedRMSNormPerHead(nn.Module):
    """RMSNorm of each head's output, then times silu(z), in fp32 (gated DeltaNet's
    output norm; the weight is one head's)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * y.to(dtype) * F.silu(z.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet: in_proj_qkvz to queries, keys, values and the output gate z (per
    query/key head: its q, k and the v, z of its value heads), in_proj_ba to the write
    strength β and the decay's input a per value head; a causal depthwise convolution
    and SiLU over (q, k, v); L2-normed q and k; the gated delta rule with the decay
    exp(-exp(A_log) · softplus(a + dt_bias)); the per-head gated RMSNorm; out_proj.
    Parameter names are Hugging Face's (Qwen3NextGatedDeltaNet)."""

    def __init__(
        self,
        dim: int,
        qk_heads: int,
        v_heads: int,
        qk_head_dim: int,
        v_head_dim: int,
        conv: int = 4,
        chunk: int = 64,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.qk_heads, self.v_heads = qk_heads, v_heads
        self.qk_head_dim, self.v_head_dim = qk_head_dim, v_head_dim
        self.key_dim, self.value_dim = qk_heads * qk_head_dim, v_heads * v_head_dim
        self.chunk = chunk
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = nn.Linear(dim, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(dim, 2 * v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            conv,
            groups=self.conv_dim,
            padding=conv - 1,
            bias=False,
        )
        self.dt_bias = nn.Parameter(torch.empty(v_heads))
        self.A_log = nn.Parameter(torch.empty(v_heads))
        self.norm = GatedRMSNormPerHead(v_head_dim, norm_eps)
        self.out_proj = nn.Linear(self.value_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj_qkvz.weight, mean=0.0, std=std)
        nn.init.normal_(self.in_proj_ba.weight, mean=0.0, std=std)
        nn.init.normal_(self.conv1d.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)
        nn.init.ones_(self.dt_bias)
        with torch.no_grad():  # A uniform in [0.01, 16] (transformers' init)
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        self.norm.init_weights()

    def forward(
        self,
        x: torch.Tensor,
        cache: DeltaNetCache | None = None,  # if KV_CACHE
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, dim); `padding` (B, S), False at padding (left-padded prompts): no
        input there, so neither the convolution nor the state sees it."""
        b, s, _ = x.shape
        if padding is not None:  # the projections have no bias: zero q, k, v, β's input
            x = x * padding[..., None].to(x.dtype)
        per = self.v_heads // self.qk_heads  # value heads per query/key head
        dk, dv = self.qk_head_dim, self.v_head_dim
        # grouped by query/key head: its q, k, then its value heads' v and z
        qkvz = self.in_proj_qkvz(x).reshape(b, s, self.qk_heads, -1)
        q, k, v, z = qkvz.split([dk, dk, per * dv, per * dv], dim=-1)
        # per query/key head: its value heads' β, then their a (indexed, not split: a
        # compiled backward cannot rejoin split gradients of the scan's layout)
        ba = self.in_proj_ba(x).unflatten(-1, (self.qk_heads, 2, per))
        beta, a = ba[..., 0, :], ba[..., 1, :]  # (B, S, Hk, per)
        qkv = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1).transpose(1, 2)
        if KV_CACHE and cache is not None:  # the convolution continues the cached inputs
            qkv = cache.convolve(qkv, self.conv1d)
        else:
            qkv = self.conv1d(qkv)[:, :, :s]  # causal: the left padding only
        qkv = F.silu(qkv).transpose(1, 2)  # (B, S, 2·key_dim + value_dim)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # each query/key head serves `per` consecutive value heads
        q = q.reshape(b, s, self.qk_heads, 1, dk).expand(-1, -1, -1, per, -1)
        k = k.reshape(b, s, self.qk_heads, 1, dk).expand(-1, -1, -1, per, -1)
        q, k = q.reshape(b, s, self.v_heads, dk).float(), k.reshape(b, s, self.v_heads, dk).float()
        q, k = l2_normalize(q) * dk**-0.5, l2_normalize(k)  # (B, S, Hv, Dk)
        v = v.reshape(b, s, self.v_heads, dv).float()
        beta = beta.reshape(b, s, self.v_heads).float().sigmoid()
        log_decay = -self.A_log.float().exp() * F.softplus(
            a.reshape(b, s, self.v_heads).float() + self.dt_bias.float()
        )
        if padding is not None:  # no decay at padding: the state stays as it is
            log_decay = log_decay * padding[..., None]
        if KV_CACHE and cache is not None:  # the rule continues the cached state
            state = cache.recurrent_state.float()
            if s == 1:  # a decoding step: the recurrence itself
                o, state = gated_delta_step(q, k, v, log_decay, beta, state)
            else:
                o, state = gated_delta_chunked(q, k, v, log_decay, beta, self.chunk, state)
            cache.recurrent_state.copy_(state)
            cache.advance(s)
        else:
            o, _ = gated_delta_chunked(q, k, v, log_decay, beta, self.chunk)
        o = self.norm(o.to(x.dtype), z.reshape(b, s, self.v_heads, dv))  # (B, S, Hv, Dv)
        return self.out_proj(o.flatten(2))
