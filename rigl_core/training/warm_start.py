"""Warm start: a job's model begins from the user's trained weights instead of a random init.

`model.weights` names a safetensors state_dict (a local file for `rigl train`; the service resolves an
uploaded `w_…` id or `model.init_from_job` to its own file). Why safetensors and a header check first:
the file is user data, so it is never unpickled, and its JSON header (names, dtypes, shapes, offsets)
is checked against the built model before a byte of tensor data is read, so a wrong file fails with
`model.weights: <the first bad parameter>` rather than a load_state_dict traceback mid-job. The same
header check runs at submit time in the API against the model built on the meta device.

`sparsity.init` then says how the sparse run starts from those weights: `random` (the paper's random
masks, today's default) or `magnitude` (one-shot magnitude pruning to the plan's per-layer counts,
then sparse training, e.g. RigL fine-tuning). GMP needs nothing more: it starts dense from the loaded
weights and prunes gradually.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAX_HEADER_BYTES = 16 << 20  # a state_dict of thousands of tensors has a header of a few hundred KB
CHUNK = 1 << 20
# safetensors dtype → bytes per element; bool/int entries are buffers (num_batches_tracked, masks)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def read_header(path: str | os.PathLike, field: str = "model.weights", max_header_bytes: int = MAX_HEADER_BYTES,
                max_tensors: int | None = None) -> dict[str, tuple[int, ...]]:
    """The tensors a safetensors file declares, {name: shape}, from its header alone (read_tensor_index)."""
    return {name: shape for name, (_dtype, shape) in
            read_tensor_index(path, field, max_header_bytes, max_tensors).items()}


def read_tensor_index(path: str | os.PathLike, field: str = "model.weights", max_header_bytes: int = MAX_HEADER_BYTES,
                      max_tensors: int | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the tensors a safetensors file declares, from its header alone; checks
    that the header is well formed and that its tensors tile the data exactly (so the file is what it
    says). A header over `max_header_bytes` is refused from the file's first 8 bytes, before any of it
    is read; more than `max_tensors` entries before any is checked. Raises ValueError naming `field`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{field}: not a safetensors file (shorter than its 8-byte header length)")
            header_bytes = int.from_bytes(head, "little")
            if 8 + header_bytes > size:
                raise ValueError(f"{field}: not a safetensors file (its first 8 bytes declare a "
                                 f"{header_bytes:,}-byte header; a pickle or torch.save file is refused)")
            if header_bytes > max_header_bytes:
                raise ValueError(f"{field}: the safetensors header is {header_bytes:,} bytes, over the "
                                 f"{max_header_bytes:,}-byte limit")
            raw = f.read(header_bytes)
    except OSError:
        raise ValueError(f"{field}: the weights file cannot be read") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"{field}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{field}: not a safetensors file (its header is not a JSON object)")
    try:  # a `\ud800` escape decodes to a lone surrogate, which no safetensors reader (nor database) takes
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: not a safetensors file (its header holds an unpaired surrogate)") from None
    header.pop("__metadata__", None)
    if not header:
        raise ValueError(f"{field}: the file holds no tensors")
    if max_tensors is not None and len(header) > max_tensors:
        raise ValueError(f"{field}: the file holds {len(header):,} tensors, over the limit of {max_tensors:,}")
    spans, index = [], {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{field}: bad safetensors entry for {name[:200]!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValueError(f"{field}: {name[:200]!r} has dtype {str(dtype)[:20]!r}, not one of {sorted(DTYPE_BYTES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and 0 <= d < 2**40 for d in shape):
            raise ValueError(f"{field}: bad shape for {name[:200]!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o < 2**63 for o in offsets)
                or offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]):
            raise ValueError(f"{field}: data_offsets of {name[:200]!r} do not match its shape and dtype")
        spans.append((offsets[0], offsets[1], name))
        index[name] = (dtype, tuple(shape))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"{field}: tensor {name[:200]!r} does not start where the previous one ends")
        position = end
    if position != size - 8 - header_bytes:
        raise ValueError(f"{field}: the tensors cover {position:,} bytes but the file holds "
                         f"{size - 8 - header_bytes:,}")
    return index


def check_values(path: str | os.PathLike, field: str = "model.weights") -> None:
    """Every floating-point value is finite, read in 1 MiB chunks (a NaN in the user's weights would
    otherwise poison every magnitude score and the first step). Call after `read_header`."""
    with open(path, "rb") as f:
        header_bytes = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_bytes))
        header.pop("__metadata__", None)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = entry["dtype"]
            if dtype not in FLOAT_DTYPES and dtype != "BF16":
                continue
            begin, end = entry["data_offsets"]
            f.seek(8 + header_bytes + begin)
            left = end - begin
            while left:
                data = f.read(min(left, CHUNK))
                if not data:
                    raise ValueError(f"{field}: {name[:200]!r} holds less data than its header declares")
                left -= len(data)
                if dtype == "BF16":  # numpy has no bfloat16: all-ones exponent bits mean inf or NaN
                    finite = not ((np.frombuffer(data, dtype="<u2") & 0x7F80) == 0x7F80).any()
                else:
                    finite = bool(np.isfinite(np.frombuffer(data, dtype=np.dtype(FLOAT_DTYPES[dtype]).newbyteorder("<"))).all())
                if not finite:
                    raise ValueError(f"{field}: {name[:200]!r} holds inf or NaN values")


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the model's state_dict (parameters and persistent buffers); works on meta."""
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def tied_names(model: nn.Module) -> dict[str, str]:
    """{name: the earlier name of the same parameter} for tied parameters (e.g. a language model's
    embedding and output layer): `safetensors.torch.save_model` stores such a tensor once."""
    first, tied = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.update({name: first[id(param)]} if id(param) in first else {})
        first.setdefault(id(param), name)
    return tied


def check_matches(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  field: str = "model.weights", tied: dict[str, str] | None = None) -> None:
    """Names and shapes equal, or ValueError naming the first missing, unexpected or mismatched tensor
    (in the model's order, so the message points at the earliest layer that differs). A `tied` name
    may be left out when the name it shares its tensor with is there."""
    tied = tied or {}
    for name, shape in expected.items():
        if name not in found and tied.get(name) in found:
            continue
        if name not in found:
            raise ValueError(f"{field}: missing {name!r} (shape {list(shape)}); the file must hold the model's "
                             f"full state_dict ({len(expected)} tensors, it holds {len(found)})")
        if found[name] != shape:
            raise ValueError(f"{field}: {name!r} has shape {list(found[name])} but the model's is {list(shape)}")
    for name in found:
        if name not in expected:
            raise ValueError(f"{field}: unexpected {name[:200]!r}, which the model does not have")


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Check the header against the model, the values for inf/NaN, then load (strict) in place, so the
    optimizer built on the model's parameters keeps them."""
    from safetensors.torch import load_file

    tied = tied_names(model)
    check_matches(read_header(path), expected_shapes(model), tied=tied)
    check_values(path)
    state = load_file(str(path), device="cpu")
    for name, source in tied.items():  # stored once: both names load the same values
        state.setdefault(name, state[source])
    model.load_state_dict(state, strict=True)


def magnitude_masks(sparsifier) -> dict[str, torch.Tensor]:
    """One-shot magnitude pruning: per masked layer, exactly the sparsifier's `target_active` largest
    |w| kept; ties go to the lower flat index (a stable sort), so every rank and rerun agrees."""
    masks = {}
    with torch.no_grad():
        for layer in sparsifier.layers:
            scores = layer.weight.detach().abs().float().reshape(-1).cpu()
            order = torch.sort(scores, descending=True, stable=True).indices
            flat = torch.zeros(scores.numel(), dtype=torch.bool)
            flat[order[:sparsifier.target_active[layer.name]]] = True
            masks[layer.name] = flat.view(layer.shape).to(layer.weight.device)
    return masks


def warm_start(spec, model: nn.Module, sparsifier) -> None:
    """The Trainer's hook, between building the model and `sparsifier.init_masks()`: load
    `model.weights` if given; with `sparsity.init: magnitude`, hand the sparsifier its first masks."""
    weights = spec.model.weights
    if weights is None:
        if spec.model.init_from_job is not None:
            raise ValueError("model.init_from_job: only the service resolves a job id; locally give "
                             "model.weights (the job's downloaded model.safetensors)")
        return
    load_weights(model, weights)
    if spec.sparsity.init == "magnitude":
        sparsifier.initial_masks = magnitude_masks(sparsifier)
