"""Offline datasets that need no files: scikit-learn's digits, MNIST-1D (generated), synthetic."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from rigl_core.data.dataset import Dataset, channel_stats, split
from rigl_core.optional import require


def digits(spec) -> Dataset:
    """8×8 handwritten digits shipped with scikit-learn (1797 images), fixed train/val split."""
    datasets = require("sklearn.datasets", "datasets", "dataset 'digits' (scikit-learn)")

    bunch = datasets.load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    xt, yt, xv, yv = split(x, y, spec.val_fraction, spec.split_seed)
    mean, std = channel_stats(xt, 1.0)
    return Dataset(xt, yt, xv, yv, num_classes=10, mean=mean, std=std)


def mnist1d(spec) -> Dataset:
    """MNIST-1D (Greydanus 2020): generated from its templates with the package's own generator, never
    downloaded; 4000 train / 1000 test sequences of length 40, shape (1, 40)."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # the package imports pyplot
    data_module = require("mnist1d.data", "datasets", "dataset 'mnist1d'")

    args = data_module.get_dataset_args()
    args.seed = 42 + spec.split_seed  # 42 is the published dataset
    state = np.random.get_state()  # the generator seeds numpy's global RNG; leave it as we found it
    try:
        data = data_module.make_dataset(args)
    finally:
        np.random.set_state(state)
    xt = torch.from_numpy(data["x"].astype(np.float32))[:, None, :]
    xv = torch.from_numpy(data["x_test"].astype(np.float32))[:, None, :]
    yt = torch.from_numpy(np.asarray(data["y"], dtype=np.int64))
    yv = torch.from_numpy(np.asarray(data["y_test"], dtype=np.int64))
    return Dataset(xt, yt, xv, yv, num_classes=10)  # already centred with unit variance


def synthetic(spec) -> Dataset:
    """Class templates plus Gaussian noise; `noise` sets the difficulty. Generated, never downloaded."""
    rng = np.random.default_rng(spec.split_seed + 12345)
    shape = list(spec.input_shape)
    dim = math.prod(shape)
    templates = rng.standard_normal((spec.num_classes, dim)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=spec.num_samples).astype(np.int64)
    x = templates[y] + spec.noise * rng.standard_normal((spec.num_samples, dim)).astype(np.float32)
    x = torch.from_numpy(x.reshape(spec.num_samples, *shape))
    xt, yt, xv, yv = split(x, torch.from_numpy(y), spec.val_fraction, spec.split_seed)
    return Dataset(xt, yt, xv, yv, num_classes=spec.num_classes)
