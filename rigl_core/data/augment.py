"""Batch augmentation on the device: random crop with zero padding and horizontal flip (CIFAR recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per sample: pad by `padding`, crop back to the original size at a random offset, flip with p=0.5."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=x.device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=x.device)
    rows = (offset_y[:, None] + torch.arange(height, device=x.device)[None, :])[:, :, None]  # B,H,1
    cols = (offset_x[:, None] + torch.arange(width, device=x.device)[None, :])[:, None, :]  # B,1,W
    flip = torch.rand(batch, generator=generator, device=x.device) < 0.5
    cols = torch.where(flip[:, None, None], (2 * offset_x[:, None, None] + width - 1) - cols, cols)
    batch_index = torch.arange(batch, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows, cols]  # B,H,W,C
    return out.permute(0, 3, 1, 2).contiguous()
