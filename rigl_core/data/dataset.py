"""Datasets as in-memory tensors, with normalisation and augmentation applied per batch on the device.

Every source returns raw train/validation tensors; `Dataset.prepare` turns a batch into model input.
The batch order is a pure function of (seed, epoch) and augmentation of (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rigl_core.data.augment import crop_flip
from rigl_core.data.holdout import validation_size


class DatasetError(ValueError):
    """Bad data or a bad dataset option; the message starts with the field, e.g. `dataset.path: ...`."""


@dataclass
class Dataset:
    """Raw tensors plus how to turn a batch of them into normalised model input."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    scale: float = 1.0  # 1/255 for uint8 images
    mean: torch.Tensor | None = None  # per channel (dim 1), after scaling
    std: torch.Tensor | None = None
    augment: bool = False  # random crop (pad 4) + horizontal flip, for CIFAR-like images
    tokens: bool = False  # x holds int64 token ids: passed to the model unchanged (never scaled or cast)

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    def to(self, device: torch.device) -> "Dataset":
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val")}
        stats = {k: (getattr(self, k).to(device) if getattr(self, k) is not None else None) for k in ("mean", "std")}
        return Dataset(**move, **stats, num_classes=self.num_classes, scale=self.scale, augment=self.augment,
                       tokens=self.tokens)

    def prepare(self, x: torch.Tensor, train: bool, seed: int = 0, step: int = 0) -> torch.Tensor:
        if self.tokens:
            return x
        x = x.float()
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.view(shape)) / self.std.view(shape)
        if train and self.augment and x.dim() == 4:
            x = self.augment_batch(x, seed, step)
        return x

    def augment_batch(self, x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """Random crop + flip of a prepared batch: a pure function of (seed, step)."""
        generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + step + 7)
        return crop_flip(x, generator)


def channel_stats(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the training set (channel = dim 1; a flat vector is one channel)."""
    data = x.float() * scale
    if data.dim() == 2:
        data = data[:, None, :]
    dims = [0] + list(range(2, data.dim()))
    mean = data.mean(dim=dims)
    std = data.std(dim=dims).clamp_min(1e-6)
    return mean, std  # a flat (N, F) input gets one global mean/std


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int):
    """A fixed split: the same seed always gives the same validation set."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = validation_size(len(x), val_fraction)
    if n_val >= len(x):
        raise DatasetError("dataset.val_fraction: leaves no training samples")
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)
