"""Token embedding and output head."""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    """Token ids (B, S) → vectors (B, S, dim)."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.embedding.weight, mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)


class OutputHead(nn.Module):
    """Hidden states (B, S, dim) → vocabulary logits (B, S, vocab)."""

    def __init__(self, dim: int, vocab: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, vocab, bias=bias)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=std)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
