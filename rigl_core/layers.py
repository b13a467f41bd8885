"""Which weights are sparse: conv and linear kernels only, never biases or norm layers (paper §3(1))."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

KERNEL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class Layer:
    """One conv/linear kernel of the model, masked or not."""

    name: str  # module name, e.g. "layer1.0.conv1"
    module: nn.Module
    masked: bool
    reason: str  # why it is (not) masked, shown in plans
    custom_density: float | None = None

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1 and module.groups == module.in_channels


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    distribution: str,
    dense_first_layer: bool | None = None,
    dense_depthwise: bool = True,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    layer_density: dict[str, float] | None = None,
) -> list[Layer]:
    """Every conv/linear kernel in module order, with the decision whether it is masked.

    The first kernel is kept dense by default for uniform and masked for ER/ERK, as in the paper.
    Raises ValueError naming the option when a pattern or override matches no layer.
    """
    include = include or []
    exclude = exclude or []
    layer_density = dict(layer_density or {})
    if dense_first_layer is None:
        dense_first_layer = distribution == "uniform"
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if not isinstance(module, KERNEL_TYPES) or getattr(module, "weight", None) is None:
            continue
        first = not layers
        masked, reason = True, "masked"
        if include and not _matches(name, include):
            masked, reason = False, "not in include"
        elif _matches(name, exclude):
            masked, reason = False, "excluded"
        elif first and dense_first_layer:
            masked, reason = False, "first layer dense"
        elif dense_depthwise and is_depthwise(module):
            masked, reason = False, "depthwise dense"
        custom = layer_density.pop(name, None)
        if custom is not None:
            if custom >= 1.0:
                masked, reason = False, "density 1 (override)"
            else:
                masked, reason = True, "density override"
        layers.append(Layer(name=name, module=module, masked=masked, reason=reason, custom_density=custom))
    if layer_density:
        raise ValueError(f"sparsity.layer_density: no conv/linear layer named {sorted(layer_density)}")
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in layers):
                raise ValueError(f"sparsity.{option}: pattern {pattern!r} matches no conv/linear layer")
    return layers
