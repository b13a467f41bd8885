"""A small Vision Transformer built only from `nn.Linear` kernels (patch embedding, q/k/v, projections, MLP,
head), so every kernel can be masked and, trained with a constant fan-in, exported condensed.

Why not torchvision's or timm's ViT: their attention packs q/k/v into `nn.MultiheadAttention` (one fused
projection that inference code cannot swap) and their patch embedding is a conv; the sizes here also fit
8×8 digits. The image is cut into a 4×4 grid of patches (patch = H/4 × W/4), plus a class token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GRID = 4  # patches per side
SIZES = {  # name: (width, depth, heads, MLP width)
    "vit-tiny": (64, 4, 4, 128),
    "vit-small": (384, 6, 6, 1536),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (p(x).view(n, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, name: str, input_shape: list[int], num_classes: int) -> None:
        super().__init__()
        dim, depth, heads, hidden = SIZES[name]
        channels, height, width = input_shape
        if height % GRID or width % GRID:
            raise ValueError(f"model.name: {name} cuts the image into a {GRID}×{GRID} grid; "
                             f"{height}×{width} does not divide by {GRID}")
        self.patch = (height // GRID, width // GRID)
        self.embed = nn.Linear(channels * self.patch[0] * self.patch[1], dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, GRID * GRID + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        ph, pw = self.patch
        patches = x.unfold(2, ph, ph).unfold(3, pw, pw)  # (N, C, 4, 4, ph, pw)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, GRID * GRID, c * ph * pw)
        tokens = torch.cat([self.cls.expand(n, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])
