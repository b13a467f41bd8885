"""Condensed export (`rigl-condensed-v1`): every constant fan-in layer as (active neurons, k) values and indices.

Why: a layer trained with a constant fan-in (`sparsity.structure: "fan-in"`, SRigL) has exactly k inputs on
every active output neuron, so it is a dense (active, k) matrix of values plus a same-shaped matrix of input
positions. That is smaller than a mask and runs fast with plain dense ops (a gather and a batched dot;
rigl_core/export/condensed_layers.py), with no sparse-matrix library in the way.

The file is safetensors, readable with numpy alone. For each condensed layer, keyed by its parameter name:
- `<param>.values`: (active, k), row r the k nonzero weights of output neuron `active[r]` in increasing input order;
- `<param>.indices`: (active, k), their input positions in the row-major flattening of one output's weights
  (for a conv, `c·kh·kw + i·kw + j`), in the smallest of uint8 / int16 / int32 that holds the fan-in;
- `<param>.active`: (active,), the output neurons with any weight, same integer rule; the others were ablated
  and output only their bias.
Every other tensor is stored dense under its own name, layers without a constant fan-in included.
Metadata key `rigl`: JSON `{"format": "rigl-condensed-v1", "values": "fp32"|"fp16"|"bf16", "layers": {param:
{"kind": "linear"|"conv"|"conv1d_hf", "shape": [...], "dtype": "float32", "k": k, "active": n, "values_dtype": ..,
"conv": {"stride", "padding", "dilation"} for convs}}, "dense": {param: reason}}`.
GPT-2's `Conv1D` stores its weight as (in, out): its output neurons are the columns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigl_core.export.compressed import (VALUE_KINDS, _NP_DTYPES, _numpy, _read_safetensors, _write_safetensors,
                                         from_bf16_bits, to_bf16_bits)
from rigl_core.sparse.layers import is_hf_conv1d

CONDENSED_FORMAT = "rigl-condensed-v1"


def index_dtype(limit: int) -> np.dtype:
    """The smallest integer type that holds 0..limit-1."""
    for dtype in (np.uint8, np.int16, np.int32):
        if limit - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def rows_of(weight: np.ndarray, kind: str) -> np.ndarray:
    """(outputs, fan-in) view of a kernel: one row per output neuron."""
    return weight.T if kind == "conv1d_hf" else weight.reshape(weight.shape[0], -1)


def condense(weight: np.ndarray, mask: np.ndarray, kind: str) -> tuple[dict[str, np.ndarray] | None, str]:
    """(values, indices, active) of a constant fan-in kernel, or (None, why not)."""
    rows = rows_of(np.asarray(mask, dtype=bool), kind)
    counts = rows.sum(axis=1)
    active = np.flatnonzero(counts)
    if active.size == 0:
        return None, "no active weights"
    k = int(counts[active[0]])
    if not (counts[active] == k).all():
        return None, (f"fan-in varies from {int(counts[active].min())} to {int(counts[active].max())} "
                      "(train with sparsity.structure: fan-in for a condensed layer)")
    w = rows_of(np.asarray(weight), kind)[active]
    cols = np.nonzero(rows[active])[1].reshape(active.size, k)  # row-major: each row's inputs in increasing order
    values = np.take_along_axis(w, cols, axis=1)
    return {"values": np.ascontiguousarray(values), "indices": cols.astype(index_dtype(rows.shape[1])),
            "active": active.astype(index_dtype(rows.shape[0]))}, ""


def _kind(module: nn.Module) -> str:
    if is_hf_conv1d(module):
        return "conv1d_hf"
    return "conv" if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "linear"


def condense_state_dict(model: nn.Module, masks: dict[str, torch.Tensor], values: str = "fp32"
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, metadata) of the container for `model` and its masks (keyed by layer or parameter name)."""
    from rigl_core.export.packed import _param_key, dense_state_dict

    if values not in VALUE_KINDS:
        raise ValueError(f"values: one of {', '.join(VALUE_KINDS)}, not {values!r}")
    state = {k: _numpy(v) for k, v in dense_state_dict(model).items()}
    by_param = {_param_key(name, state): _numpy(mask) for name, mask in masks.items()}
    modules = dict(model.named_modules())
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, dict] = {}
    dense: dict[str, str] = {}
    for name, tensor in state.items():
        mask = by_param.get(name)
        module = modules.get(name.rpartition(".")[0])
        if mask is None or tensor.ndim < 2 or module is None:
            arrays[name] = tensor
            continue
        kind = _kind(module)
        parts, why = condense(tensor, mask, kind)
        if parts is None or (kind == "conv" and getattr(module, "groups", 1) != 1):
            dense[name] = why or "grouped convolution"
            arrays[name] = tensor
            continue
        stored, stored_dtype = _stored(parts["values"], values)
        arrays.update({f"{name}.values": stored, f"{name}.indices": parts["indices"], f"{name}.active": parts["active"]})
        entry = {"kind": kind, "shape": list(tensor.shape), "dtype": tensor.dtype.name, "k": int(parts["values"].shape[1]),
                 "active": int(parts["active"].size), "values_dtype": stored_dtype}
        if kind == "conv":
            entry["conv"] = {a: list(getattr(module, a)) for a in ("stride", "padding", "dilation")}
        layers[name] = entry
    meta = {"format": CONDENSED_FORMAT, "values": values, "layers": layers, "dense": dense}
    return arrays, {"rigl": json.dumps(meta)}


def _stored(values: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    if kind == "fp16":
        return values.astype(np.float16), "float16"
    if kind == "bf16":
        return to_bf16_bits(values), "bfloat16"
    return values, values.dtype.name


def save_condensed(model: nn.Module, masks: dict[str, torch.Tensor], path: str | os.PathLike,
                   values: str = "fp32") -> Path:
    """Write the condensed export of `model` (masks applied to its weights) to `path`."""
    from rigl_core.export.packed import _umask

    arrays, metadata = condense_state_dict(model, masks, values)
    path = Path(path)
    _write_safetensors(arrays, metadata, path)
    os.chmod(path, 0o666 & ~_umask())
    return path


def read_condensed_layers(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """The raw arrays and the `rigl` metadata of a condensed file; raises ValueError if it is not one."""
    arrays, metadata = _read_safetensors(path)
    meta = json.loads(metadata.get("rigl", "{}"))
    if meta.get("format") != CONDENSED_FORMAT:
        raise ValueError(f"{path}: not a {CONDENSED_FORMAT} file")
    return arrays, meta


def layer_values(arrays: dict[str, np.ndarray], name: str, entry: dict) -> np.ndarray:
    """A condensed layer's values in the weight's dtype (half-precision storage upcast)."""
    stored = arrays[f"{name}.values"]
    if entry["values_dtype"] == "bfloat16":
        stored = from_bf16_bits(stored)
    return stored.astype(_NP_DTYPES[entry["dtype"]])


def densify(arrays: dict[str, np.ndarray], name: str, entry: dict) -> np.ndarray:
    """The dense kernel of one condensed layer, zeros included."""
    shape = entry["shape"]
    outputs = shape[1] if entry["kind"] == "conv1d_hf" else shape[0]
    fan_in = shape[0] if entry["kind"] == "conv1d_hf" else int(np.prod(shape[1:]))
    rows = np.zeros((outputs, fan_in), dtype=_NP_DTYPES[entry["dtype"]])
    active = arrays[f"{name}.active"].astype(np.int64)
    sub = np.zeros((active.size, fan_in), dtype=rows.dtype)
    np.put_along_axis(sub, arrays[f"{name}.indices"].astype(np.int64), layer_values(arrays, name, entry), axis=1)
    rows[active] = sub
    return rows.T.copy() if entry["kind"] == "conv1d_hf" else rows.reshape(shape)


def read_condensed(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The dense state_dict (numpy) of a condensed file, equal to the dense export."""
    arrays, meta = read_condensed_layers(path)
    state: dict[str, np.ndarray] = {}
    for name, entry in meta["layers"].items():
        state[name] = densify(arrays, name, entry)
    for key, array in arrays.items():
        base, _, suffix = key.rpartition(".")
        if base in meta["layers"] and suffix in ("values", "indices", "active"):
            continue
        state[key] = array
    return state
