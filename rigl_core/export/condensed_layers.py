"""Inference modules for the condensed export: `CondensedLinear`, `CondensedConv2d`, and `load_condensed`,
which swaps them into a freshly built model.

    model = build_my_model()                        # the architecture the job trained
    load_condensed(model, "model.condensed.safetensors")
    model.eval()(x)                                 # equals the dense export's output (float tolerance)

A condensed layer computes only its active output neurons, each a dot product of its k weights with the k
inputs they connect to (rigl_core/export/condensed_kernel.py), then places them among the outputs; ablated
neurons output their bias. Layers the file stores dense (no constant fan-in, attention, recurrent) are
loaded into the model's own modules unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from rigl_core.export.condensed import densify, layer_values, read_condensed_layers
from rigl_core.export.condensed_kernel import BAG_FROM, BoundRows, bag_of, condensed_matmul

INDEX_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


class CondensedLinear(nn.Module):
    """y = x Wᵀ + b with W stored as (active, k) values and input indices."""

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, indices: torch.Tensor,
                 active: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", values.float().contiguous())
        self.register_buffer("indices", indices.contiguous())
        flat, offsets = bag_of(self.indices)  # the embedding-bag form, for batches of 4 rows or more
        self.register_buffer("bag_indices", flat, persistent=False)
        self.register_buffer("bag_offsets", offsets, persistent=False)
        # Output j reads column where[j] of [active outputs | one zero column]: a gather, which ONNX exports.
        where = torch.full((out_features,), len(active), dtype=torch.long)
        where[active.long()] = torch.arange(len(active))
        self.register_buffer("where", where)
        self.all_active = len(active) == out_features and bool((active.long() == torch.arange(out_features)).all())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] < BAG_FROM and self.all_active:  # batch 1..3: one bound kernel call
            bound = self._bound_for(x)
            if bound is not None:
                return bound(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.all_active:
            y = condensed_matmul(x, self.indices, self.values, (self.bag_indices, self.bag_offsets), self.bias)
        else:
            y = condensed_matmul(x, self.indices, self.values, (self.bag_indices, self.bag_offsets))
            y = torch.cat([y, y.new_zeros(y.shape[0], 1)], dim=1)[:, self.where]
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _bound_for(self, x: torch.Tensor) -> BoundRows | None:
        """The compiled kernel bound to this layer, when it may run `x` (CPU float32, no autograd, not traced)."""
        if x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous() or torch.jit.is_tracing() \
                or (torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad)) \
                or torch.compiler.is_compiling():
            return None
        bound = self.__dict__.get("_bound")
        if bound is None or bound.ready and bound.keep[1] is not self.values:  # first call, or the module moved
            bound = self.__dict__["_bound"] = BoundRows(self.indices, self.values, self.bias)
        return bound if bound.ready else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, active={len(self.values)}"


class CondensedConv2d(CondensedLinear):
    """A 2-D convolution (groups 1, zero padding) as im2col + the condensed product over C·kh·kw.
    On CPUs the unfold costs more than the sparsity saves for most convs: measure before you pick it."""

    def __init__(self, conv: nn.Conv2d, values: torch.Tensor, indices: torch.Tensor, active: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        super().__init__(fan_in, conv.out_channels, values, indices, active, bias)
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C·kh·kw, L)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = super().forward(cols.transpose(1, 2))  # (N, L, out)
        return y.transpose(1, 2).reshape(n, self.out_features, oh, ow)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _swappable(module: nn.Module, entry: dict) -> bool:
    """Linear and plain Conv2d layers with some weight left out. A layer that keeps every input of every
    output (an ERK-dense last layer, say) stays the model's own module: a dense product beats a gather
    over all of its inputs."""
    kind = entry["kind"]
    if kind == "linear" and isinstance(module, nn.Linear):
        fan_in, rows = module.in_features, module.out_features
    elif kind == "conv" and isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        fan_in, rows = module.weight[0].numel(), module.out_channels
    else:
        return False
    return not (entry["active"] == rows and entry["k"] == fan_in)


def load_condensed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a condensed export into `model` (built with the job's architecture), in place; returns it.
    Linear and Conv2d layers stored condensed become CondensedLinear / CondensedConv2d (inference only);
    every other weight, condensed GPT-2 Conv1D kernels included, is densified into the model's own modules."""
    arrays, meta = read_condensed_layers(path)
    return condense_into(model, arrays, meta, path)


def condense_into(model: nn.Module, arrays: dict, meta: dict, source: object = "the condensed arrays") -> nn.Module:
    """`load_condensed` from the container's arrays and `rigl` metadata (condense_state_dict's, or a file's)."""
    state: dict[str, torch.Tensor] = {}
    swapped: set[str] = set()
    for name, entry in meta["layers"].items():
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if name.endswith(".weight") and _swappable(module, entry):
            values = torch.from_numpy(layer_values(arrays, name, entry))
            indices = torch.from_numpy(arrays[f"{name}.indices"])
            active = torch.from_numpy(arrays[f"{name}.active"].astype("int64"))
            bias = torch.from_numpy(arrays[f"{module_name}.bias"]) if f"{module_name}.bias" in arrays else None
            if entry["kind"] == "linear":
                new = CondensedLinear(module.in_features, module.out_features, values, indices, active, bias)
            else:
                new = CondensedConv2d(module, values, indices, active, bias)
            _swap(model, module_name, new)
            swapped.add(module_name)
        else:
            state[name] = torch.from_numpy(densify(arrays, name, entry))
    for key, array in arrays.items():
        base, _, suffix = key.rpartition(".")
        if base in meta["layers"] and suffix in ("values", "indices", "active"):
            continue
        if key.rpartition(".")[0] in swapped:
            continue  # the bias went into the condensed module
        state[key] = torch.from_numpy(array)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in swapped]
    if missing or unexpected:
        raise ValueError(f"{source}: does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model
