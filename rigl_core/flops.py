"""FLOPs accounting (paper App. H): forward FLOPs ≈ 2·nnz·(output positions) per conv/linear kernel.

Biases, norms, activations and pooling are not counted, as in the paper's sanity numbers; the
ratios sparse/dense are what the paper reports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rigl_core.layers import KERNEL_TYPES


def output_positions(model: nn.Module, input_shape: list[int]) -> dict[str, int]:
    """Per conv/linear module: how many output positions each kernel entry is applied at, per sample.

    Runs one forward on the meta device, so it costs nothing even for ResNet-50.
    """
    positions: dict[str, int] = {}
    hooks = []

    def make_hook(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            if isinstance(module, nn.Linear):
                count = math.prod(output.shape[1:-1])  # tokens for sequence inputs, 1 otherwise
            else:
                count = math.prod(output.shape[2:])  # spatial positions
            positions[name] = positions.get(name, 0) + int(count)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, KERNEL_TYPES):
            hooks.append(module.register_forward_hook(make_hook(name, module)))
    try:
        meta_model = model if _on_meta(model) else None
        if meta_model is None:
            import copy

            meta_model = copy.deepcopy(model).to("meta")
            # hooks are copied with the module, but they refer to the original names: fine.
        was_training = meta_model.training
        meta_model.eval()
        with torch.no_grad():
            meta_model(torch.empty(1, *input_shape, device="meta"))
        meta_model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return positions


def _on_meta(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "meta"


def training_flops_ratio(
    method: str,
    dense_flops: float,
    sparse_flops: float,
    delta_t: int,
    t_end_fraction: float,
    gmp_curve: list[float] | None = None,
) -> float:
    """Training FLOPs per sample relative to dense training (3·f_D), per paper App. H."""
    f_d, f_s = dense_flops, sparse_flops
    if f_d == 0:
        return 1.0
    if method == "dense":
        cost = 3 * f_d
    elif method in ("static", "set", "snip"):
        cost = 3 * f_s
    elif method == "snfs":
        cost = 2 * f_s + f_d
    elif method == "rigl":
        during = (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1)
        cost = t_end_fraction * during + (1 - t_end_fraction) * 3 * f_s
    elif method == "gmp":
        # gmp_curve: forward FLOPs sampled uniformly over training along the pruning schedule.
        curve = gmp_curve or [f_d]
        cost = 3 * sum(curve) / len(curve)
    else:
        raise ValueError(f"unknown method {method!r}")
    return cost / (3 * f_d)
