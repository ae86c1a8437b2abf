"""The next token from logits: greedy, or sampled with temperature, top-k and top-p.

Shared by text generation (runtime/generate.py) and captioning (runtime/vlm_generate.py).
"""

from __future__ import annotations

import torch


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k largest logits of each row (exactly k, ties broken by index)."""
    k = min(k, logits.shape[-1])
    idx = logits.topk(k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """True for the nucleus of each row: the smallest set of most probable
    tokens whose total probability is at least p (a token is kept when the
    mass of the tokens sorted before it is still below p)."""
    sorted_probs, idx = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    keep_sorted = mass_before < p
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Logits with everything outside top-k, then outside the top-p nucleus of
    what remains, set to -inf."""
    if top_k is not None:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(~top_p_mask(logits.softmax(dim=-1), top_p), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """(B, V) logits → (B,) next tokens: argmax at temperature 0, else a sample."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
