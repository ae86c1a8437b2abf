"""Token embedding and output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The target of a position that is not trained on (cross-entropy's ignore_index).
IGNORE_INDEX = -100
# The fused head + cross-entropy works on this many logits at a time: 2**24 fp32
# values (64 MiB) whatever the vocabulary, e.g. 130 tokens at 128,256.
LOSS_CHUNK_LOGITS = 1 << 24

EMBED_SCALE = True  # feature: the embedding multiplies its vectors (Gemma: sqrt(dim); Granite)
LOGIT_SOFTCAP = True  # feature: the head soft-caps its logits (Gemma 2)
LOGIT_SCALE = True  # feature: some head scales its logits (`logit_scale`, Cohere's, Granite's)
HEAD_BIAS = True  # feature: the head has a bias
FUSED_LOSS = True  # feature: the head's cross-entropy is fused and chunked (a wide vocabulary)


class TokenEmbedding(nn.Module):
    """Token ids (B, S) → vectors (B, S, dim)."""

    def __init__(
        self,
        vocab: int,
        dim: int,
        scale: float = 1.0,  # if EMBED_SCALE
    ) -> None:
        super().__init__()
        if EMBED_SCALE:
            self.scale = scale
        self.embedding = nn.Embedding(vocab, dim)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.embedding.weight, mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if EMBED_SCALE:
            # the multiplier rounded to the table's dtype first, as Gemma does
            scale = torch.tensor(self.scale, dtype=self.embedding.weight.dtype)
            return self.embedding(tokens) * scale.to(tokens.device)
        return self.embedding(tokens)


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the logits `x @ weight.T + bias` against `targets`, summed
    over the targets that are not `IGNORE_INDEX`, one chunk of `chunk` rows at a
    time: the (N, vocab) logits never exist at once.

    While a chunk's fp32 logits are at hand the forward also turns them into
    their gradient (softmax minus one-hot) and keeps only what that gives x,
    weight and bias; the backward scales those by the incoming gradient. So the
    peak is one chunk's logits, not N × vocab. The matmuls run in the autocast
    dtype when autocast is on (as nn.Linear would), the softmax in fp32.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk: int,
        softcap: float = 0.0,  # if LOGIT_SOFTCAP
    ) -> torch.Tensor:
        device = x.device.type
        # autocast's dtype for the matmuls, as nn.Linear's; none on meta (forgec plan)
        autocast = device != "meta" and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        needs_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(device if autocast else "cpu", enabled=False):  # off: none to undo
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
            grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
            for start in range(0, x.shape[0], chunk):
                x_c = x[start : start + chunk].to(dtype)
                t = targets[start : start + chunk]
                trained = t != IGNORE_INDEX
                t = torch.where(trained, t, 0)
                logits = F.linear(x_c, w, b).float()  # (chunk, vocab)
                if LOGIT_SOFTCAP and softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = softcap * capped
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                total = logits.sub_(top).exp_().sum(dim=-1)  # in place: logsumexp would copy
                loss += torch.where(trained, total.log() + top.squeeze(1) - picked, 0.0).sum()
                if not needs_grad:
                    continue
                grad = logits.div_(total[:, None])  # d loss / d logits = softmax - one-hot
                grad.scatter_add_(1, t[:, None], -torch.ones_like(grad[:, :1]))
                if LOGIT_SOFTCAP and softcap:
                    grad = grad.mul_(1 - capped.square())  # through softcap · tanh(z / softcap)
                grad = grad.mul_(trained[:, None]).to(dtype)  # zero on ignored rows
                if grad_x is not None:
                    grad_x[start : start + chunk] = (grad @ w).to(x.dtype)
                if grad_w.dtype == dtype:
                    grad_w.addmm_(grad.T, x_c)
                else:
                    grad_w += grad.T @ x_c
                if grad_b is not None:
                    grad_b += grad.sum(dim=0)
        ctx.has_bias = bias is not None
        if needs_grad:
            saved = [g for g in (grad_x, grad_w.to(weight.dtype), grad_b) if g is not None]
            ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # Scaled in place (no second copy of the head's gradient) unless autograd keeps the
        # graph: a pipeline schedule's split backward calls this for inputs, then weights.
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        saved = [g * grad_loss if keep else g.mul_(grad_loss) for g in ctx.saved_tensors]
        grad_b = saved.pop() if ctx.has_bias else None
        grad_w, grad_x = saved.pop(), saved.pop() if saved else None
        need = ctx.needs_input_grad  # (a None too many without softcap: autograd allows it)
        return grad_x, grad_w if need[1] else None, grad_b if need[2] else None, None, None, None


class OutputHead(nn.Module):
    """Hidden states (B, S, dim) → vocabulary logits (B, S, vocab)."""

    def __init__(
        self,
        dim: int,
        vocab: int,
        bias: bool = False,
        softcap: float = 0.0,  # if LOGIT_SOFTCAP
        logit_scale: float = 1.0,  # if LOGIT_SCALE
    ) -> None:
        super().__init__()
        if LOGIT_SOFTCAP:
            self.softcap = softcap
        self.proj = nn.Linear(dim, vocab, bias=bias)
        if LOGIT_SCALE:
            self.logit_scale = logit_scale

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=std)
        if HEAD_BIAS and self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits; or, given `targets` (B, S), their fp32 cross-entropy summed
        over the targets that are not IGNORE_INDEX."""
        if targets is not None and targets.shape != x.shape[:-1]:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)}, expected {tuple(x.shape[:-1])}"
            )
        if FUSED_LOSS and targets is not None:  # chunk by chunk: never all the logits at once
            if LOGIT_SCALE:
                x = x * self.logit_scale  # the same logits: the head has no bias (E083)
            chunk = max(1, LOSS_CHUNK_LOGITS // self.proj.out_features)
            if LOGIT_SOFTCAP:
                return LinearCrossEntropy.apply(
                    x.flatten(0, -2),
                    self.proj.weight,
                    self.proj.bias,
                    targets.flatten(),
                    chunk,
                    self.softcap,
                )
            return LinearCrossEntropy.apply(
                x.flatten(0, -2), self.proj.weight, self.proj.bias, targets.flatten(), chunk
            )
        logits = self.proj(x)  # (B, S, vocab)
        if LOGIT_SCALE:
            logits = logits * self.logit_scale
        if LOGIT_SOFTCAP and self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        if not FUSED_LOSS and targets is not None:
            return F.cross_entropy(
                logits.flatten(0, -2).float(),
                targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        return logits
