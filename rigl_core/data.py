"""Dataset registry (in-memory tensors) and a deterministic, resumable batch order."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rigl_core.spec import DatasetSpec


@dataclass
class Dataset:
    """Train/validation tensors plus what a model needs to know about them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    input_shape: list[int]
    num_classes: int


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Fixed stratification-free split: the same seed always gives the same split."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _digits(spec: DatasetSpec) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # pixels 0..16 → [-1, 1]
    x = x[:, None, :, :]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    xt, yt, xv, yv = _split(x, y, spec.val_fraction, spec.split_seed)
    return Dataset(*(torch.from_numpy(a) for a in (xt, yt, xv, yv)), input_shape=[1, 8, 8], num_classes=10)


def _synthetic(spec: DatasetSpec) -> Dataset:
    """Class templates plus Gaussian noise; `noise` sets the difficulty. Generated, never downloaded."""
    rng = np.random.default_rng(spec.split_seed + 12345)
    shape = list(spec.input_shape)
    dim = math.prod(shape)
    templates = rng.standard_normal((spec.num_classes, dim)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=spec.num_samples).astype(np.int64)
    x = templates[y] + spec.noise * rng.standard_normal((spec.num_samples, dim)).astype(np.float32)
    x = x.reshape(spec.num_samples, *shape)
    xt, yt, xv, yv = _split(x, y, spec.val_fraction, spec.split_seed)
    return Dataset(*(torch.from_numpy(a) for a in (xt, yt, xv, yv)), input_shape=shape, num_classes=spec.num_classes)


DATASETS = {"digits": _digits, "synthetic": _synthetic}


def load_dataset(spec: DatasetSpec) -> Dataset:
    return DATASETS[spec.name](spec)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch depends only on (seed, epoch): resuming needs just the position."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)
