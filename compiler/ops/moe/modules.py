"""Mixture of experts: routers, packed experts run by grouped matmuls, the MoE layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..mlp.modules import SwiGLU

# Features: the generated model keeps a guarded branch only where its spec uses it.
SHARED = True  # feature: shared experts that every token uses
SHARED_GATE = True  # feature: a sigmoid gate on the shared experts' output
CAPACITY = True  # feature: a per-expert capacity in training
ZERO_INIT = True  # feature: some MoE's down projections start at zero
EXPERT_BIAS = True  # feature: experts with biases on their projections
CLAMPED_SWIGLU = True  # feature: experts with gpt-oss's clamped SwiGLU
ROUTER_BIAS = True  # feature: a router with a bias on its logits


class SoftmaxTopK(nn.Module):
    """Router: softmax over experts, then the top-k (Switch / Mixtral style).

    In training it records the load-balancing loss E · Σ_i f_i · P_i (f_i: share
    of routed slots, P_i: mean probability of expert i) and the router z-loss,
    each times its weight.
    """

    def __init__(
        self,
        dim: int,
        experts: int,
        top_k: int,
        renormalize: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        bias: bool = False,  # if ROUTER_BIAS
    ) -> None:
        super().__init__()
        self.experts, self.top_k, self.renormalize = experts, top_k, renormalize
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.weight = nn.Parameter(torch.empty(experts, dim))
        if ROUTER_BIAS:
            self.bias = nn.Parameter(torch.empty(experts)) if bias else None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.register_buffer("expert_counts", torch.zeros(experts), persistent=False)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if ROUTER_BIAS and self.bias is not None:
            nn.init.zeros_(self.bias)
        self.expert_counts.zero_()

    def set_step(self, step: int, max_steps: int) -> None:
        """Nothing is scheduled for this router."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, dim) → weights and expert ids (B·S, top_k)."""
        if ROUTER_BIAS and self.bias is not None:
            flat = x.reshape(-1, x.shape[-1]).float()
            logits = F.linear(flat, self.weight.float(), self.bias.float())  # (T, E)
        else:
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())  # (T, E)
        probs = logits.softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(ids.flatten(), minlength=self.experts).float()
        self.expert_counts = counts.detach()
        if not self.training:
            self.aux_loss = self.z_loss = None
        else:
            share = counts / ids.numel()
            self.aux_loss = self.aux_loss_weight * self.experts * (share * probs.mean(dim=0)).sum()
            self.z_loss = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        return weights.type_as(x), ids


class SigmoidTopK(nn.Module):
    """Router (DeepSeek-V3): experts chosen on sigmoid scores plus a balancing bias.

    The bias is a buffer, never trained by the optimizer: `set_step` moves it by
    rate · (1/E − load) from a moving average of each expert's share of the
    routed slots. Gate weights come from the unbiased scores (normalised, then
    scaled by `routed_scale`). With `n_group` > 1 a token may only use experts of
    its `topk_group` best groups (a group's score: the sum of its two best
    experts' scores).
    """

    def __init__(
        self,
        dim: int,
        experts: int,
        top_k: int,
        bias_rate: float = 1e-3,
        schedule: str = "constant",
        load_ema: float = 0.9,
        normalize: bool = True,
        routed_scale: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        seq_aux_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.bias_rate, self.schedule, self.load_ema = bias_rate, schedule, load_ema
        self.normalize, self.routed_scale = normalize, routed_scale
        self.n_group, self.topk_group = n_group, topk_group
        self.seq_aux_loss_weight, self.z_loss_weight = seq_aux_loss_weight, z_loss_weight
        self.weight = nn.Parameter(torch.empty(experts, dim))
        self.register_buffer("expert_bias", torch.zeros(experts))
        self.register_buffer("load", torch.full((experts,), 1.0 / experts))
        self.register_buffer("pending", torch.zeros(experts), persistent=False)
        self.register_buffer("expert_counts", torch.zeros(experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        self.expert_bias.zero_()
        self.load.fill_(1.0 / self.experts)
        self.pending.zero_()
        self.expert_counts.zero_()

    def rate(self, step: int, max_steps: int) -> float:
        progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
        if self.schedule == "cosine_decay":
            return self.bias_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "linear_warmup":
            return self.bias_rate * min(1.0, progress / 0.1)  # full rate after 10 % of training
        return self.bias_rate

    @torch.no_grad()
    def set_step(self, step: int, max_steps: int) -> None:
        """Move the bias toward balance with the load routed since the last call."""
        total = self.pending.sum()
        if total > 0:
            self.load.mul_(self.load_ema).add_((1 - self.load_ema) * self.pending / total)
            self.expert_bias.add_(self.rate(step, max_steps) * (1.0 / self.experts - self.load))
            self.pending.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, dim) → weights and expert ids (B·S, top_k)."""
        b, s, dim = x.shape
        logits = F.linear(x.reshape(-1, dim).float(), self.weight.float())  # (T, E)
        scores = logits.sigmoid()
        choice = scores + self.expert_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.experts // self.n_group)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            best = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), -1e9)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scale
        counts = torch.bincount(ids.flatten(), minlength=self.experts).float()
        self.expert_counts = counts.detach()
        if not self.training:
            self.aux_loss = self.z_loss = None
        else:
            self.pending += counts.detach()
            self.z_loss = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
            # sequence-wise balance loss: f_i (scaled share of slots) · P_i per sequence
            chosen = torch.zeros_like(scores).scatter_(1, ids, 1.0).view(b, s, -1)
            share = chosen.sum(dim=1) * self.experts / (self.top_k * s)
            prob = (scores / scores.sum(dim=-1, keepdim=True)).view(b, s, -1).mean(dim=1)
            self.aux_loss = self.seq_aux_loss_weight * (share * prob).sum(dim=-1).mean()
        return weights.type_as(x), ids


class SparseMixerGrad(torch.autograd.Function):
    """sparsemixer's gradient for a pick in training (Liu et al. 2024, as transformers'
    PhiMoE computes it): the forward value is the pick's softmax weight times a midpoint
    factor; the backward sends the router logits the softmax's gradient at the sampled
    expert, δ_j·g − p_j·g (g: the output's gradient times the weight), and nothing else."""

    @staticmethod
    def forward(ctx, logits, weight, ids, probs, midpoint):
        ctx.save_for_backward(weight, ids, probs)
        return weight * midpoint

    @staticmethod
    def backward(ctx, grad):
        weight, ids, probs = ctx.saved_tensors
        grad = grad * weight
        grad_logits = (probs * -grad).scatter_add(-1, ids, grad)
        return grad_logits, None, None, None, None


def sparsemixer_pick(
    logits: torch.Tensor, remaining: torch.Tensor, jitter_eps: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pick of sparsemixer: (weight, expert) per token, each (T, 1).

    `remaining` are the logits with earlier picks at -inf. The softmax covers the
    experts whose logits lie within 2·jitter_eps of the best remaining one, relative
    to max(|logit|, best); evaluation picks the best, training samples the softmax
    (Gumbel-max) and scales the weight by 1 where the sample is the best (or, at
    random, a quarter of the time) and by 1/3 otherwise (Heun's midpoint).
    """
    with torch.no_grad():
        best, best_id = remaining.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=best)
        outside = (best - logits) / factor > 2 * jitter_eps
    gates = remaining.masked_fill(outside, float("-inf"))
    if training:  # Gumbel-max: a sample of softmax(gates)
        noise = torch.empty_like(gates).exponential_().log()
        ids = (gates - noise).max(dim=-1)[1].unsqueeze(-1)
    else:
        ids = best_id
    probs = gates.softmax(dim=-1)
    weight = probs.gather(-1, ids)
    if not training:
        return weight, ids
    top = probs.max(dim=-1, keepdim=True)[1]
    full = (ids == top) | (torch.rand_like(weight) > 0.75)
    midpoint = torch.add(0.3333, full, alpha=0.6667).type_as(probs)
    return SparseMixerGrad.apply(logits, weight, ids, probs, midpoint), ids


class SparseMixer(nn.Module):
    """Router (PhiMoE): sparsemixer's two picks. The first is the best expert, weighed
    by a softmax over the experts within 2·jitter_eps (relative) of it; the second the
    same among the others. The weights are not renormalised.

    In training each pick is sampled from its softmax and the router learns through
    sparsemixer's gradient estimate (`sparsemixer_pick`); the load-balancing loss
    E · Σ_i f_i · P_i takes f_i from the top-2 of the plain softmax (as transformers'
    balance loss does), the z-loss as the other routers.
    """

    def __init__(
        self,
        dim: int,
        experts: int,
        top_k: int,
        jitter_eps: float = 0.01,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.experts, self.top_k, self.jitter_eps = experts, top_k, jitter_eps
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.weight = nn.Parameter(torch.empty(experts, dim))
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.register_buffer("expert_counts", torch.zeros(experts), persistent=False)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        self.expert_counts.zero_()

    def set_step(self, step: int, max_steps: int) -> None:
        """Nothing is scheduled for this router."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, dim) → weights and expert ids (B·S, 2)."""
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())  # (T, E)
        first_weight, first = sparsemixer_pick(logits, logits, self.jitter_eps, self.training)
        others = logits.scatter(-1, first, float("-inf"))
        second_weight, second = sparsemixer_pick(logits, others, self.jitter_eps, self.training)
        weights = torch.cat([first_weight, second_weight], dim=-1)
        ids = torch.cat([first, second], dim=-1)
        counts = torch.bincount(ids.flatten(), minlength=self.experts).float()
        self.expert_counts = counts.detach()
        if not self.training:
            self.aux_loss = self.z_loss = None
        else:
            probs = logits.softmax(dim=-1)
            top = probs.topk(self.top_k, dim=-1).indices
            share = torch.bincount(top.flatten(), minlength=self.experts).float() / top.numel()
            self.aux_loss = self.aux_loss_weight * self.experts * (share * probs.mean(dim=0)).sum()
            self.z_loss = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        return weights.type_as(x), ids


GROUPED_MM = True  # use torch._grouped_mm where the device and dtype allow it


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by expert, counts[e] rows for expert e) times w[e] (E, in, out)."""
    if torch.compiler.is_compiling():
        # torch.compile traces one opaque op (its shape rule holds for every dtype);
        # torch._grouped_mm's own rule admits only bf16, its CPU kernel also fp32
        return GROUPED_MM_OP(x, w.to(x.dtype), counts)
    return eager_grouped_mm(x, w, counts)


def eager_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm as it runs outside torch.compile."""
    if GROUPED_MM and grouped_mm_fits(x, w):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.to(x.dtype), offs=offsets)
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(x[start : start + n] @ w[e].to(x.dtype))
        start += n
    return torch.cat(out)


def grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs x (N, in) by w (E, in, out) on this device."""
    # torch._grouped_mm needs 16-byte aligned rows: 4 fp32 or 8 bf16 values
    on_cpu = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[-1] % 4 == 0
        and w.shape[-1] % 4 == 0
    )
    on_gpu = (
        x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and x.shape[-1] % 8 == 0
        and w.shape[-1] % 8 == 0
    )
    return hasattr(torch, "_grouped_mm") and (on_cpu or on_gpu)


def register_grouped_mm_op():
    """`forgec::grouped_mm`: eager_grouped_mm as a custom op, with a shape rule for
    torch.compile and a backward made of grouped matmuls (the gradients of
    torch._grouped_mm, bit for bit). Registered once per process."""
    if hasattr(torch.ops.forgec, "grouped_mm"):  # another generated model did
        return torch.ops.forgec.grouped_mm

    @torch.library.custom_op("forgec::grouped_mm", mutates_args=())
    def op(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return eager_grouped_mm(x, w, counts)

    @torch.library.custom_op("forgec::grouped_mm_weight_grad", mutates_args=())
    def weight_grad(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(E, in, out): x[rows of e]ᵀ @ grad[rows of e] for each expert e."""
        if GROUPED_MM and grouped_mm_fits(x, grad[None]) and x.shape[0] % 4 == 0:
            return torch._grouped_mm(x.t(), grad, offs=counts.cumsum(0).to(torch.int32))
        out, start = [], 0
        for n in counts.tolist():
            out.append(x[start : start + n].t() @ grad[start : start + n])
            start += n
        return torch.stack(out)

    @op.register_fake
    def _(x, w, counts):
        return x.new_empty(x.shape[0], w.shape[-1])

    @weight_grad.register_fake
    def _(x, grad, counts):
        return x.new_empty(counts.shape[0], x.shape[1], grad.shape[1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        x, w, counts = ctx.saved_tensors
        grad_x = op(grad, w.transpose(1, 2), counts) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(x, grad, counts) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


GROUPED_MM_OP = register_grouped_mm_op()


def clamped_swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float
) -> torch.Tensor:
    """gpt-oss's SwiGLU: the gate clamped above, up both ways, a sharper sigmoid, up + 1."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with packed weights (E, in, out)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        experts: int,
        bias: bool = False,  # if EXPERT_BIAS
        swiglu_limit: float = 0.0,  # if CLAMPED_SWIGLU
        swiglu_alpha: float = 1.702,  # if CLAMPED_SWIGLU
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(experts, dim, hidden))
        self.up_proj = nn.Parameter(torch.empty(experts, dim, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, dim))
        if EXPERT_BIAS:
            self.bias = bias
        if EXPERT_BIAS and bias:
            self.gate_bias = nn.Parameter(torch.empty(experts, hidden))
            self.up_bias = nn.Parameter(torch.empty(experts, hidden))
            self.down_bias = nn.Parameter(torch.empty(experts, dim))
        if CLAMPED_SWIGLU:
            self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, dim) sorted by expert → (N, dim)."""
        if EXPERT_BIAS or CLAMPED_SWIGLU:
            return self.compute(x, counts, **dict(self.named_parameters(recurse=False)))
        else:
            return self.compute(x, counts, self.gate_proj, self.up_proj, self.down_proj)

    def compute(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        gate_proj: torch.Tensor,
        up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        gate_bias: torch.Tensor | None = None,  # if EXPERT_BIAS
        up_bias: torch.Tensor | None = None,  # if EXPERT_BIAS
        down_bias: torch.Tensor | None = None,  # if EXPERT_BIAS
    ) -> torch.Tensor:
        """The experts of the given weights (E', in, out) on x sorted by expert
        (counts: E'); expert parallelism runs it on a rank's own E' experts."""
        gate = grouped_mm(x, gate_proj, counts)
        up = grouped_mm(x, up_proj, counts)
        if EXPERT_BIAS and gate_bias is not None:  # each row gets its expert's biases
            rows = torch.arange(x.shape[0], device=x.device)
            expert = torch.searchsorted(counts.cumsum(0), rows, right=True)  # (N,)
            gate, up = gate + gate_bias[expert], up + up_bias[expert]
        if CLAMPED_SWIGLU and self.swiglu_limit:
            hidden = clamped_swiglu(gate, up, self.swiglu_limit, self.swiglu_alpha)
            out = grouped_mm(hidden, down_proj, counts)
        else:
            out = grouped_mm(F.silu(gate) * up, down_proj, counts)
        if EXPERT_BIAS and down_bias is not None:
            out = out + down_bias[expert]
        return out


class MoE(nn.Module):
    """Mixture of experts: each token goes to its router's top_k experts (and to the
    shared experts, if any).

    Tokens are sorted by expert and each weight runs as one grouped matmul.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        experts: int,
        top_k: int,
        router: nn.Module,
        shared_hidden: int = 0,  # if SHARED
        shared_gate: bool = False,  # if SHARED_GATE
        capacity_factor: float = 0.0,  # if CAPACITY
        zero_init: bool = False,  # if ZERO_INIT
        bias: bool = False,  # if EXPERT_BIAS
        swiglu_limit: float = 0.0,  # if CLAMPED_SWIGLU
        swiglu_alpha: float = 1.702,  # if CLAMPED_SWIGLU
    ) -> None:
        super().__init__()
        self.experts_count, self.top_k = experts, top_k
        self.router = router
        if EXPERT_BIAS or CLAMPED_SWIGLU:
            self.experts = GroupedExperts(
                dim,
                hidden,
                experts,
                bias=bias,  # if EXPERT_BIAS
                swiglu_limit=swiglu_limit,  # if CLAMPED_SWIGLU
                swiglu_alpha=swiglu_alpha,  # if CLAMPED_SWIGLU
            )
        else:
            self.experts = GroupedExperts(dim, hidden, experts)
        if SHARED:
            self.shared_experts = SwiGLU(dim, shared_hidden) if shared_hidden else None
            if ZERO_INIT and self.shared_experts is not None:
                self.shared_experts.zero_init = zero_init
        if SHARED_GATE:  # σ(x·w) per token scales the shared experts' output (Qwen2-MoE)
            self.shared_experts_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        if CAPACITY:
            self.capacity_factor = capacity_factor
        if ZERO_INIT:
            self.zero_init = zero_init
        self.dropped = 0  # slots over capacity in the last forward (a tensor in training)

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        nn.init.normal_(self.experts.gate_proj, mean=0.0, std=std)
        nn.init.normal_(self.experts.up_proj, mean=0.0, std=std)
        if ZERO_INIT and self.zero_init:
            nn.init.zeros_(self.experts.down_proj)
        else:
            nn.init.normal_(self.experts.down_proj, mean=0.0, std=out_std)
        if SHARED and self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        if SHARED_GATE and self.shared_experts_gate is not None:
            nn.init.normal_(self.shared_experts_gate.weight, mean=0.0, std=std)
        if EXPERT_BIAS and self.experts.bias:
            for bias in (self.experts.gate_bias, self.experts.up_bias, self.experts.down_bias):
                nn.init.zeros_(bias)

    @property
    def dropped_tokens(self) -> int:
        return int(self.dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        flat = x.reshape(-1, dim)  # (T, dim), T = B·S tokens
        weights, ids = self.router(x)  # (T, k) each
        # slot-major order: every token's first choice, then every second choice
        expert = ids.t().reshape(-1)  # (T·k,)
        weight = weights.t().reshape(-1)
        token = torch.arange(flat.shape[0], device=x.device).repeat(self.top_k)
        if CAPACITY:
            # In training an expert takes at most ceil(T·k/E · capacity_factor) of the
            # T·k routed slots; overflow slots are dropped (the token keeps its residual
            # and its other experts), first choices before second choices, earlier tokens
            # (in flattened batch order) first. Evaluation never drops.
            self.dropped = 0
            if self.training and self.capacity_factor > 0:
                capacity = math.ceil(ids.numel() / self.experts_count * self.capacity_factor)
                order = torch.argsort(expert, stable=True)
                first = torch.searchsorted(expert[order], expert[order], right=False)
                rank = torch.empty_like(order)
                rank[order] = torch.arange(order.numel(), device=x.device) - first
                keep = rank < capacity
                self.dropped = (~keep).sum()  # read as an int after the step, not here
                expert, weight, token = expert[keep], weight[keep], token[keep]
        order = torch.argsort(expert, stable=True)
        expert, weight, token = expert[order], weight[order], token[order]
        counts = torch.bincount(expert, minlength=self.experts_count)  # (E,)
        routed = self.experts(flat[token], counts) * weight[:, None]  # (slots, dim)
        out = torch.zeros_like(flat).index_add_(0, token, routed)
        if SHARED and self.shared_experts is not None:
            if SHARED_GATE and self.shared_experts_gate is not None:
                gate = torch.sigmoid(self.shared_experts_gate(flat))  # (T, 1)
                out = out + gate * self.shared_experts(flat)
            else:
                out = out + self.shared_experts(flat)
        return out.view(b, s, dim)


class ExpertsMeasured:
    """`with ExpertsMeasured(model, grouped_matmul):` while `model` is measured on the
    meta device (forgec plan): the experts' grouped matmuls run `grouped_matmul`
    (grouped_mm's arguments: a stand-in that needs no per-expert row counts), and no
    slot is dropped for capacity, so every token reaches its top_k experts (an upper
    bound of what a capacity keeps)."""

    def __init__(self, model: nn.Module, grouped_matmul) -> None:
        self.stand_in = grouped_matmul
        self.capped = [m for m in model.modules() if getattr(m, "capacity_factor", 0.0) > 0]
        self.factors = [m.capacity_factor for m in self.capped]

    def __enter__(self) -> None:
        global grouped_mm
        self.original, grouped_mm = grouped_mm, self.stand_in
        for m in self.capped:
            m.capacity_factor = 0.0

    def __exit__(self, *exc) -> None:
        global grouped_mm
        grouped_mm = self.original
        for m, factor in zip(self.capped, self.factors, strict=True):
            m.capacity_factor = factor
