"""Name → loader for every dataset a JobSpec can name."""

from __future__ import annotations

from rigl_core.data.dataset import Dataset
from rigl_core.data.builtin import digits, mnist1d, synthetic
from rigl_core.data.files import cifar_dataset, idx_dataset, imagefolder_dataset
from rigl_core.data.tensors import tensors_dataset

SOURCES = {
    "digits": digits,
    "mnist1d": mnist1d,
    "synthetic": synthetic,
    "mnist": idx_dataset,
    "fashion-mnist": idx_dataset,
    "cifar10": cifar_dataset,
    "cifar100": cifar_dataset,
    "imagefolder": imagefolder_dataset,
    "tensors": tensors_dataset,
}


def load_dataset(spec) -> Dataset:
    """Build the dataset a DatasetSpec names. Raises DatasetError naming the field."""
    return SOURCES[spec.name](spec)
