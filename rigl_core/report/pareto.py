"""The Pareto frontier of (accuracy, cost) points: which configurations are worth choosing.

A sweep trades validation accuracy against a cost (inference FLOPs, exported bytes); a point is on the
frontier when no other point is at least as accurate and at most as costly, and strictly better in one.
Pure Python and torch-free, so the API, the CLI and the report share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, maximising accuracy (first) and minimising cost (second),
    ordered by cost then by accuracy descending. Points with a None or NaN coordinate are left out;
    identical points are all kept (neither dominates the other)."""
    valid = [(i, float(a), float(c)) for i, (a, c) in enumerate(points)
             if a is not None and c is not None and not math.isnan(float(a)) and not math.isnan(float(c))]
    ordered = sorted(valid, key=lambda p: (p[2], -p[1]))  # cheapest first, the most accurate of a cost first
    kept: list[tuple[int, float, float]] = []
    best = -math.inf  # highest accuracy among the points kept so far (all at most as costly)
    for index, accuracy, cost in ordered:
        if accuracy > best:
            kept.append((index, accuracy, cost))
            best = accuracy
        elif kept and accuracy == kept[-1][1] and cost == kept[-1][2]:
            kept.append((index, accuracy, cost))  # a twin of a frontier point
    return [index for index, _a, _c in kept]


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n - 1); sd is None for fewer than two values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
