"""Vision encoders: patch embedding, and adapters from vision width to text width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbedding(nn.Module):
    """Images (B, channels, H, W) → patch tokens (B, S, dim): a strided convolution,
    an optional CLS token and learned positions."""

    def __init__(
        self,
        channels: int,
        patch: int,
        dim: int,
        image_size: int,
        positions: str,
        cls_token: bool,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        tokens = (image_size // patch) ** 2 + (1 if cls_token else 0)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim)) if cls_token else None
        learned = positions == "learned"
        self.pos_embedding = nn.Parameter(torch.empty(1, tokens, dim)) if learned else None

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=std)
        nn.init.zeros_(self.proj.bias)
        for p in (self.cls_token, self.pos_embedding):
            if p is not None:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"images must be {size}×{size}, got {tuple(pixels.shape[-2:])}")
        x = self.proj(pixels).flatten(2).transpose(1, 2)  # (B, patches, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        return x


class MLP2Adapter(nn.Module):
    """Adapter: image tokens (B, N, in_dim) → (B, N, out_dim) by Linear → GELU → Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def init_weights(self, std: float) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, mean=0.0, std=std)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class AvgPoolAdapter(nn.Module):
    """Adapter: average each window × window block of the square patch grid, then
    map to the text width: (B, grid², in_dim) → (B, (grid / window)², out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.proj = nn.Linear(in_dim, out_dim)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        grid = int(n**0.5)
        x = x.transpose(1, 2).reshape(b, d, grid, grid)
        x = F.avg_pool2d(x, self.window).flatten(2).transpose(1, 2)
        return self.proj(x)


class AttentionPoolAdapter(nn.Module):
    """Adapter: a learned query attends over each window × window block of the square
    patch grid, then maps to the text width: (B, grid², in_dim) → (B, (grid / window)², out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window = window
        self.query = nn.Parameter(torch.empty(1, 1, in_dim))
        self.attention = nn.MultiheadAttention(in_dim, heads, batch_first=True)
        self.proj = nn.Linear(in_dim, out_dim)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.query, mean=0.0, std=std)
        nn.init.normal_(self.attention.in_proj_weight, mean=0.0, std=std)
        nn.init.zeros_(self.attention.in_proj_bias)
        nn.init.normal_(self.attention.out_proj.weight, mean=0.0, std=std)
        nn.init.zeros_(self.attention.out_proj.bias)
        nn.init.normal_(self.proj.weight, mean=0.0, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        grid, w = int(n**0.5), self.window
        cells = grid // w
        # (B, grid, grid, d) → one row of w·w patches per pooled cell
        x = x.view(b, cells, w, cells, w, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, d)
        pooled, _ = self.attention(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return self.proj(pooled.view(b, cells * cells, d))
