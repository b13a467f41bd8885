"""Building modules from a declarative Architecture (rigl_core/models/architecture.py): shape inference on the
meta device, caps, and the real model. Apart from the pydantic models so that validating a JobSpec
(the API server, the CLI's client commands) does not import torch until an architecture is checked.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from rigl_core.models.architecture import Architecture, ArchitectureError, Limits


class ResidualBlock(nn.Module):
    def __init__(self, body: nn.Sequential, projection: nn.Module | None):
        super().__init__()
        self.body = body
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.projection is None else self.projection(x)
        return self.body(x) + shortcut


class _Builder:
    """Walks the spec, infers shapes, enforces caps and builds modules."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.depth = 0
        self.params = 0
        self.names: set[str] = set()

    def build(self, layers: list, shape: tuple[int, ...], path: str) -> tuple[nn.Sequential, tuple[int, ...]]:
        modules: "OrderedDict[str, nn.Module]" = OrderedDict()
        for index, spec in enumerate(layers):
            where = f"{path}[{index}]"
            self.depth += 1
            if self.depth > self.limits.max_depth:
                raise ArchitectureError(where, f"more than {self.limits.max_depth} layers (limit)")
            module, shape = self.layer(spec, shape, where)
            name = spec.name or f"{spec.type.replace('-', '_')}{index}"
            if name in self.names:
                raise ArchitectureError(f"{where}.name", f"duplicate layer name {name!r}")
            self.names.add(name)
            modules[name] = module
        return nn.Sequential(modules), shape

    def _count(self, module: nn.Module, where: str) -> None:
        self.params += sum(p.numel() for p in module.parameters())
        if self.params > self.limits.max_params:
            raise ArchitectureError(where, f"the model exceeds {self.limits.max_params:,} parameters (limit)")

    def _width(self, value: int, where: str) -> None:
        if value > self.limits.max_width:
            raise ArchitectureError(where, f"{value} exceeds the width limit {self.limits.max_width}")

    def layer(self, spec, shape: tuple[int, ...], where: str) -> tuple[nn.Module, tuple[int, ...]]:
        kind = spec.type
        if kind == "linear":
            self._width(spec.out_features, f"{where}.out_features")
            module = nn.Linear(shape[-1], spec.out_features, bias=spec.bias, device="meta")
            self._count(module, where)
            return module, (*shape[:-1], spec.out_features)
        if kind in ("conv1d", "conv2d"):
            dims = 1 if kind == "conv1d" else 2
            if len(shape) != dims + 1:
                expected = "C,L" if dims == 1 else "C,H,W"
                raise ArchitectureError(where, f"{kind} needs input {expected}, got shape {list(shape)}")
            self._width(spec.out_channels, f"{where}.out_channels")
            if spec.kernel_size > self.limits.max_kernel:
                raise ArchitectureError(f"{where}.kernel_size", f"larger than {self.limits.max_kernel}")
            channels = shape[0]
            if channels % spec.groups or spec.out_channels % spec.groups:
                raise ArchitectureError(f"{where}.groups", f"{spec.groups} does not divide {channels} in and "
                                                          f"{spec.out_channels} out channels")
            if spec.padding == "same" and spec.stride != 1:
                raise ArchitectureError(f"{where}.padding", "'same' padding needs stride 1")
            cls = nn.Conv1d if dims == 1 else nn.Conv2d
            module = cls(channels, spec.out_channels, spec.kernel_size, stride=spec.stride, padding=spec.padding,
                         groups=spec.groups, bias=spec.bias, device="meta")
            pad = (spec.kernel_size - 1) // 2 if spec.padding == "same" else spec.padding
            spatial = []
            for size in shape[1:]:
                out = (size + 2 * pad - spec.kernel_size) // spec.stride + 1
                if spec.padding == "same":
                    out = size
                if out < 1:
                    raise ArchitectureError(f"{where}.kernel_size", f"{spec.kernel_size} is larger than the input "
                                                                   f"{list(shape[1:])} (plus padding)")
                spatial.append(out)
            self._count(module, where)
            return module, (spec.out_channels, *spatial)
        if kind in ("batchnorm1d", "batchnorm2d"):
            want = (2, 1) if kind == "batchnorm1d" else (3,)
            if len(shape) not in want:
                raise ArchitectureError(where, f"{kind} cannot follow shape {list(shape)}")
            cls = nn.BatchNorm1d if kind == "batchnorm1d" else nn.BatchNorm2d
            module = cls(shape[0], device="meta")
            self._count(module, where)
            return module, shape
        if kind == "layernorm":
            module = nn.LayerNorm(shape[-1], device="meta")
            self._count(module, where)
            return module, shape
        if kind in ("relu", "gelu", "tanh", "sigmoid"):
            return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[kind](), shape
        if kind in ("maxpool", "avgpool"):
            if len(shape) not in (2, 3):
                raise ArchitectureError(where, f"{kind} needs a C,L or C,H,W input, got {list(shape)}")
            stride = spec.stride or spec.kernel_size
            spatial = [(size - spec.kernel_size) // stride + 1 for size in shape[1:]]
            if any(s < 1 for s in spatial):
                raise ArchitectureError(f"{where}.kernel_size", f"{spec.kernel_size} is larger than the input "
                                                               f"{list(shape[1:])}")
            two_d = len(shape) == 3
            cls = {("maxpool", True): nn.MaxPool2d, ("maxpool", False): nn.MaxPool1d,
                   ("avgpool", True): nn.AvgPool2d, ("avgpool", False): nn.AvgPool1d}[(kind, two_d)]
            return cls(spec.kernel_size, stride=stride), (shape[0], *spatial)
        if kind == "adaptive-avg-pool":
            if len(shape) not in (2, 3):
                raise ArchitectureError(where, f"adaptive-avg-pool needs a C,L or C,H,W input, got {list(shape)}")
            cls = nn.AdaptiveAvgPool2d if len(shape) == 3 else nn.AdaptiveAvgPool1d
            return cls(spec.output_size), (shape[0], *[spec.output_size] * (len(shape) - 1))
        if kind == "flatten":
            return nn.Flatten(), (math.prod(shape),)
        if kind == "dropout":
            return nn.Dropout(spec.p), shape
        if kind == "residual":
            saved_names = self.names
            self.names = set()
            body, out_shape = self.build(spec.layers, shape, f"{where}.layers")
            self.names = saved_names
            projection = None
            if out_shape != shape:
                if not spec.projection:
                    raise ArchitectureError(
                        where, f"the block maps {list(shape)} to {list(out_shape)}; set projection: true or keep "
                               "the shape")
                projection = self._projection(shape, out_shape, where)
            return ResidualBlock(body, projection), out_shape
        raise ArchitectureError(where, f"unknown layer type {kind!r}")  # unreachable: pydantic checks types

    def _projection(self, shape, out_shape, where) -> nn.Module:
        if len(shape) != len(out_shape):
            raise ArchitectureError(f"{where}.projection", f"cannot project {list(shape)} to {list(out_shape)}")
        if len(shape) == 1:
            module = nn.Linear(shape[0], out_shape[0], bias=False, device="meta")
        else:
            strides = {s // o if o else 0 for s, o in zip(shape[1:], out_shape[1:])}
            stride = strides.pop() if len(strides) == 1 else 0
            if stride < 1 or any((s - 1) // stride + 1 != o for s, o in zip(shape[1:], out_shape[1:])):
                raise ArchitectureError(f"{where}.projection", f"no 1×1 strided projection maps {list(shape)} "
                                                               f"to {list(out_shape)}")
            cls = nn.Conv1d if len(shape) == 2 else nn.Conv2d
            module = cls(shape[0], out_shape[0], 1, stride=stride, bias=False, device="meta")
        self._count(module, f"{where}.projection")
        return module


def infer(arch: Architecture, limits: Limits | None = None) -> tuple[nn.Sequential, tuple[int, ...], int]:
    """Check shapes and caps; returns the meta-device model, its output shape and parameter count."""
    builder = _Builder(limits or Limits())
    model, out_shape = builder.build(arch.layers, tuple(arch.input_shape), "layers")
    return model, out_shape, builder.params


def build_architecture(arch: Architecture, num_classes: int | None = None, device=None,
                       limits: Limits | None = None) -> nn.Sequential:
    """A real, freshly initialised model; raises ArchitectureError when the output is not `num_classes` logits."""
    meta, out_shape, _ = infer(arch, limits)
    if len(out_shape) != 1:
        raise ArchitectureError("layers", f"the network must end in a flat vector of logits, got shape "
                                          f"{list(out_shape)} (add flatten and linear)")
    if num_classes is not None and out_shape[0] != num_classes:
        raise ArchitectureError("layers", f"the last layer gives {out_shape[0]} outputs but there are "
                                          f"{num_classes} classes")
    if device is not None and torch.device(device).type == "meta":
        return meta
    model = meta.to_empty(device=device or "cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    return model
