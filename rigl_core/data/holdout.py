"""How many samples the fixed train/validation split holds out when a dataset has no validation set.

One rule for the loaders (which split) and for submit-time checks (which count the training set
without loading it); torch-free, so the API server can use it.
"""

from __future__ import annotations


def validation_size(total: int, val_fraction: float) -> int:
    """round(total × val_fraction), at least one sample."""
    return max(1, int(round(total * val_fraction)))


def training_size(total: int, val_fraction: float) -> int:
    """What the split leaves for training (0 or less: nothing, which the callers refuse)."""
    return total - validation_size(total, val_fraction)
