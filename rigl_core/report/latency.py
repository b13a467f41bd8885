"""Measured inference latency of a trained model on this machine's CPU, one thread, batch 1: the cost a
sweep's Pareto view can plot beside FLOPs and bytes (FLOPs say nothing of whether a format runs faster).

Side by side in one call: the dense export as PyTorch runs it, and for a constant fan-in run the condensed
model (rigl_core/export/condensed_layers.py). Median of rounds, each round timing every variant in turn,
within a small time budget, so a worker spends about a second per variant on it.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

BUDGET_S = 1.0  # per variant
MAX_ROUNDS = 50


def _example(model: nn.Module, input_shape) -> torch.Tensor:
    if getattr(model, "input_dtype", None) == torch.long:
        return torch.randint(0, int(getattr(model, "vocab_size", 2)), (1, *input_shape))
    return torch.randn(1, *input_shape)


def measure_latency(variants: dict[str, nn.Module], input_shape) -> dict[str, float]:
    """Median ms per batch-1 forward of each variant (CPU, fp32, one thread), measured side by side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = {name: copy.deepcopy(m).to("cpu").float().eval() for name, m in variants.items()}
        x = _example(next(iter(models.values())), input_shape)
        times: dict[str, list[float]] = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():
                model(x)  # warm-up: kernels compiled, buffers allocated
            began = time.perf_counter()
            while time.perf_counter() - began < BUDGET_S * len(models) and len(times[next(iter(times))]) < MAX_ROUNDS:
                for name, model in models.items():
                    start = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - start)
        return {name: 1000 * statistics.median(t) for name, t in times.items()}
    finally:
        torch.set_num_threads(threads)
