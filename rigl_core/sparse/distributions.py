"""Per-layer sparsities: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK) with exact capping.

The budget S is over masked layers only; layers with an explicit density are outside it
(docs/algorithm.md "Sparsity distributions", following google-research/rigl sparse_utils).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def zeros_count(numel: int, sparsity: float) -> int:
    """floor(s·N), robust to float noise such as 0.9·1000 = 899.9999999."""
    return min(numel, int(math.floor(sparsity * numel + 1e-9)))


def active_count(numel: int, sparsity: float) -> int:
    return numel - zeros_count(numel, sparsity)


def _raw_density(shape: Sequence[int], distribution: str, power: float) -> float:
    if distribution == "er":
        # PyTorch kernels are (out, in, *kernel); ER ignores the kernel dims.
        n_out, n_in = shape[0], shape[1] if len(shape) > 1 else 1
        return (n_in + n_out) / (n_in * n_out)
    return (sum(shape) / math.prod(shape)) ** power


def layer_sparsities(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    distribution: str,
    custom: Sequence[float | None] | None = None,
    erk_power_scale: float = 1.0,
) -> list[float]:
    """Sparsity of each masked layer. `custom[i]` is an explicit density for layer i (outside the budget)."""
    custom = list(custom) if custom is not None else [None] * len(shapes)
    if distribution == "uniform":
        return [1.0 - c if c is not None else sparsity for c in custom]
    if distribution not in ("er", "erk"):
        raise ValueError(f"unknown distribution {distribution!r}")
    power = erk_power_scale if distribution == "erk" else 1.0
    numels = [math.prod(s) for s in shapes]
    raw = [_raw_density(s, distribution, power) for s in shapes]
    budget = [i for i, c in enumerate(custom) if c is None]
    dense: set[int] = set()
    while True:
        rhs = 0.0
        divisor = 0.0
        for i in budget:
            zeros = zeros_count(numels[i], sparsity)
            if i in dense:
                rhs -= zeros
            else:
                rhs += numels[i] - zeros
                divisor += raw[i] * numels[i]
        if divisor == 0.0:
            if not budget:
                break
            raise ValueError(f"sparsity.sparsity: {sparsity} cannot be distributed with {distribution}")
        epsilon = rhs / divisor
        max_raw = max(raw[i] for i in budget if i not in dense)
        if max_raw * epsilon > 1.0:
            dense.update(i for i in budget if i not in dense and raw[i] == max_raw)
            continue
        break
    result = []
    for i, c in enumerate(custom):
        if c is not None:
            result.append(1.0 - c)
        elif i in dense:
            result.append(0.0)
        else:
            result.append(max(0.0, 1.0 - epsilon * raw[i]))
    return result
