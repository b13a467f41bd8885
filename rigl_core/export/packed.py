"""Exports: the dense state_dict with exact zeros, and a packed sparse safetensors file.

Packed format (`rigl-packed-v1`), readable with numpy alone:
- `<name>.values`: the active entries of tensor `<name>` in row-major (C) order, original dtype;
- `<name>.mask`: the boolean mask, flattened row-major and packed 8 per byte with
  `numpy.packbits(bitorder="little")`, uint8;
- any tensor that is not masked is stored unchanged under its own name;
- safetensors metadata key `rigl`: JSON `{"format": "rigl-packed-v1", "tensors": {name: {"shape": [...],
  "dtype": "float32", "nnz": N}}}` for every packed tensor; with `values="fp16"|"bf16"` the values are
  stored in that precision (`"values_dtype"`) and `load_packed` casts them back to `dtype`.

The entropy-coded export is in rigl_core/export/compressed.py, the ONNX export in rigl_core/export/onnx.py.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

PACKED_FORMAT = "rigl-packed-v1"


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it, briefly, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    """safetensors writes 0600 whatever the umask; give exports the mode of every other output file
    (0644 under the usual umask 022), so a shared results folder or a web server can read them."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_dense(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`model.safetensors`: loads with plain `load_state_dict(strict=True)` into the unmodified model."""
    path = Path(path)
    _save(dense_state_dict(model), path, metadata)
    return path


HALF = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def pack_state_dict(
    state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], values: str = "fp32"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split masked tensors into values + packed bits; `masks` is keyed by state_dict name."""
    if values not in HALF:
        raise ValueError(f"values: one of fp32, fp16, bf16, not {values!r}")
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    for name, tensor in state.items():
        mask = masks.get(name)
        if mask is None:
            tensors[name] = tensor.contiguous()
            continue
        flat_mask = mask.detach().cpu().reshape(-1)
        nz = tensor.reshape(-1)[flat_mask]
        half = HALF[values] and nz.is_floating_point()
        tensors[f"{name}.values"] = (nz.to(HALF[values]) if half else nz).contiguous()
        bits = np.packbits(flat_mask.numpy().astype(np.uint8), bitorder="little")
        tensors[f"{name}.mask"] = torch.from_numpy(bits)
        info[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                      "nnz": int(flat_mask.sum()),
                      "values_dtype": str(tensors[f"{name}.values"].dtype).removeprefix("torch.")}
    return tensors, {"rigl": json.dumps({"format": PACKED_FORMAT, "tensors": info})}


def save_packed(model: nn.Module, masks: dict[str, torch.Tensor], path: str | os.PathLike,
                values: str = "fp32") -> Path:
    """Write the packed export; `masks` keyed by module name (e.g. "fc1") or parameter name."""
    state = dense_state_dict(model)
    by_param = {_param_key(k, state): v for k, v in masks.items()}
    tensors, metadata = pack_state_dict(state, by_param, values)
    path = Path(path)
    _save(tensors, path, metadata)
    return path


def save_compressed_model(model: nn.Module, masks: dict[str, torch.Tensor], path: str | os.PathLike,
                          values: str = "fp32") -> Path:
    """The entropy-coded export (rigl_core/export/compressed.py) of `model`; masks keyed as in save_packed."""
    from rigl_core.export.compressed import save_compressed

    state = dense_state_dict(model)
    path = save_compressed(state, {_param_key(k, state): v for k, v in masks.items()}, path, values)
    os.chmod(path, 0o666 & ~_umask())
    return path


def _param_key(name: str, state: dict[str, torch.Tensor]) -> str:
    """A mask's state_dict key: layer names are parameter names ("rnn.weight_ih_l0"), module names
    ("fc1" -> "fc1.weight") or attention projections ("attn.in_proj" -> "attn.in_proj_weight")."""
    for key in (name, f"{name}.weight", f"{name}_weight"):
        if key in state:
            return key
    return f"{name}.weight"


def load_packed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Unpack to a dense state_dict identical to `model.safetensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("rigl", "{}"))
    if meta.get("format") != PACKED_FORMAT:
        raise ValueError(f"{path}: not a {PACKED_FORMAT} file")
    raw = load_file(str(path))
    state: dict[str, torch.Tensor] = {}
    packed = meta["tensors"]
    for name, entry in packed.items():
        numel = int(np.prod(entry["shape"], dtype=np.int64))
        bits = np.unpackbits(raw[f"{name}.mask"].numpy(), count=numel, bitorder="little").astype(bool)
        values = raw[f"{name}.values"]
        dense = torch.zeros(numel, dtype=getattr(torch, entry["dtype"]))
        dense[torch.from_numpy(bits)] = values.to(dense.dtype)
        state[name] = dense.view(entry["shape"])
    for key, tensor in raw.items():
        base = key.rsplit(".", 1)[0]
        if base in packed and key in (f"{base}.values", f"{base}.mask"):
            continue
        state[key] = tensor
    return state


@contextlib.contextmanager
def stored_values(model: nn.Module, masks: dict[str, torch.Tensor], values: str):
    """Inside, the masked weights hold what a reader of a `values` export gets back (rounded to fp16/bf16
    and cast back); restored exactly on exit. Lets a run measure the accuracy its half-precision export
    costs before writing it."""
    if values not in HALF:
        raise ValueError(f"values: one of fp32, fp16, bf16, not {values!r}")
    params = dict(model.named_parameters())
    keys = {_param_key(k, params) for k in masks} & params.keys()
    kept = {k: params[k].detach().clone() for k in keys if HALF[values] and params[k].is_floating_point()}
    try:
        with torch.no_grad():
            for key in kept:
                params[key].copy_(params[key].to(HALF[values]).to(params[key].dtype))
        yield
    finally:
        with torch.no_grad():
            for key, original in kept.items():
                params[key].copy_(original)
