"""What a dataset looks like without loading it: for validating a job at submit time."""

from __future__ import annotations

from dataclasses import dataclass

from rigl_core.data.holdout import training_size


@dataclass
class DatasetShape:
    input_shape: list[int]
    num_classes: int | None  # None: known only once the files are read (imagefolder)
    num_train: int | None


def describe(spec) -> DatasetShape | None:
    """Shape, classes and training-set size of a built-in or file dataset; None for uploaded tensors."""
    name = spec.name
    if name == "digits":
        return DatasetShape([1, 8, 8], 10, training_size(1797, spec.val_fraction))
    if name == "mnist1d":
        return DatasetShape([1, 40], 10, 4000)
    if name == "synthetic":
        return DatasetShape(list(spec.input_shape), spec.num_classes, training_size(spec.num_samples, spec.val_fraction))
    if name in ("mnist", "fashion-mnist"):
        return DatasetShape([1, 28, 28], 10, 60000)
    if name in ("cifar10", "cifar100"):
        return DatasetShape([3, 32, 32], 10 if name == "cifar10" else 100, 50000)
    if name == "imagefolder":
        return DatasetShape([3, spec.image_size, spec.image_size], None, None)
    return None
