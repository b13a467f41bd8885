"""Model registry: built-in `mlp` and `lenet5`, plus every torchvision classification model by name."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from torch import nn

BUILTIN_MODELS = ("mlp", "lenet5")


@functools.lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def available_models() -> tuple[str, ...]:
    return BUILTIN_MODELS + torchvision_classifiers()


def default_input_shape(name: str) -> list[int]:
    """Input shape used by `rigl plan` when none is given: MNIST for the built-ins, ImageNet otherwise."""
    if name in BUILTIN_MODELS:
        return [1, 28, 28]
    return [3, 224, 224]


def default_num_classes(name: str) -> int:
    return 10 if name in BUILTIN_MODELS else 1000


class MLP(nn.Sequential):
    """Flatten then Linear+ReLU layers named fc1, fc2, …; the default 300-100 is LeNet-300-100."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: list[int] | None = None):
        sizes = [in_features, *(hidden_sizes if hidden_sizes is not None else [300, 100]), num_classes]
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(a, b)))
            if i < len(sizes) - 1:
                layers.append((f"relu{i}", nn.ReLU()))
        super().__init__(OrderedDict(layers))


class LeNet5(nn.Module):
    """LeNet-5 (6 and 16 5×5 filters, 120-84 classifier); 'same' padding so small inputs (8×8 digits) fit."""

    def __init__(self, input_shape: list[int], num_classes: int):
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h, w = input_shape[1] // 4, input_shape[2] // 4
        if h < 1 or w < 1:
            raise ValueError("lenet5 needs inputs of at least 4×4")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        # He-normal init: PyTorch's default leaves this deep, narrow ReLU net barely trainable once sparse.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(
    name: str,
    num_classes: int,
    input_shape: list[int],
    hidden_sizes: list[int] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build a freshly initialised model; `device="meta"` builds shapes only (for plans and validation)."""
    with torch.device(device or "cpu"):
        if name == "mlp":
            return MLP(math.prod(input_shape), num_classes, hidden_sizes)
        if name == "lenet5":
            if len(input_shape) != 3:
                raise ValueError("lenet5 needs an input shape C,H,W")
            return LeNet5(input_shape, num_classes)
        if name in torchvision_classifiers():
            import torchvision

            if hidden_sizes is not None:
                raise ValueError("hidden_sizes applies to mlp only")
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}")
