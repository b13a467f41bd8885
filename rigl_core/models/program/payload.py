"""A program's weights and tensor constants, read as raw bytes by their JSON configs: never unpickled.

`torch.export.save` stores each storage as raw bytes (`data/weights/weight_N`) and describes every
tensor in `model_weights_config.json` (dtype, sizes, strides, offset into its storage); a tensor
subclass is stored as a *pickle* instead (`use_pickle: true`), which `torch.export.load` loads with
`weights_only=False`. Here a pickled entry is refused, every description is checked (plain strided
layout, a dtype of ours, a view that stays inside its storage, a storage of whole elements) before a
byte is used, and tensors that share a storage keep sharing it (tied weights stay tied).

`read_payload(..., meta=True)` makes meta tensors of the same shapes without reading the bytes (plans
and submit-time checks); `check_values` streams each storage once to refuse inf/NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rigl_core.models.program.archive import Pt2Archive
from rigl_core.models.program.errors import ProgramError
from rigl_core.models.program.graph_rules import check_fqn

DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
          7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}  # torch's ScalarType numbers
STRIDED = 7
MAX_DIMS = 8


@dataclass(frozen=True)
class TensorEntry:
    name: str  # the state_dict name
    member: str  # the archive member holding its storage
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    is_param: bool
    requires_grad: bool


def parse_config(archive: Pt2Archive, label: str, folder: str, prefix: str) -> list[TensorEntry]:
    """Check the weights or constants config (member `label`) against the archive; `prefix` is `weight_` or
    `tensor_`, the storages' names in `folder`."""
    config = archive.json(label)
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise ProgramError(f"{label}: not a payload config")
    entries = []
    for name, entry in config["config"].items():
        check_fqn(name)
        if not isinstance(entry, dict):
            raise ProgramError(f"{label}: bad entry for {name!r}")
        if entry.get("use_pickle"):
            raise ProgramError(f"{label}: {name} is stored as a pickle (a tensor subclass); only plain tensors "
                               "are accepted")
        path = entry.get("path_name")
        member = f"{folder}{path}"
        if not isinstance(path, str) or not path.startswith(prefix) or not archive.has(member):
            raise ProgramError(f"{label}: {name} points at {str(path)[:60]!r}, which the archive does not hold")
        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict) or meta.get("layout") != STRIDED or meta.get("dtype") not in DTYPES:
            raise ProgramError(f"{label}: {name} is not a plain strided tensor of a supported dtype")
        sizes, strides = _ints(meta.get("sizes"), name, label), _ints(meta.get("strides"), name, label)
        offset = _ints([meta.get("storage_offset")], name, label)[0]
        if len(sizes) != len(strides) or len(sizes) > MAX_DIMS:
            raise ProgramError(f"{label}: {name} has {len(sizes)} sizes and {len(strides)} strides")
        entry_ = TensorEntry(name, member, DTYPES[meta["dtype"]], sizes, strides, offset,
                             bool(entry.get("is_param")), bool(meta.get("requires_grad")))
        _check_inside(entry_, archive.size(member), label)
        entries.append(entry_)
    return entries


def _ints(values: object, name: str, label: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, dict) and type(v.get("as_int")) is int
                                               and 0 <= v["as_int"] < 2**48 for v in values):
        raise ProgramError(f"{label}: {name} has symbolic or invalid sizes")
    return tuple(v["as_int"] for v in values)


def _check_inside(entry: TensorEntry, nbytes: int, label: str) -> None:
    itemsize = torch.empty((), dtype=entry.dtype).element_size()
    if nbytes % itemsize:
        raise ProgramError(f"{label}: {entry.name}'s storage is not a whole number of {entry.dtype} values")
    if math.prod(entry.sizes) == 0:
        return
    last = entry.offset + sum((size - 1) * stride for size, stride in zip(entry.sizes, entry.strides))
    if last >= nbytes // itemsize:
        raise ProgramError(f"{label}: {entry.name} reaches past the end of its storage")


def read_payload(archive: Pt2Archive, entries: list[TensorEntry], meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors by name: views into one CPU storage per member (or meta tensors of the same shapes)."""
    storages: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        if meta:
            tensor = torch.empty_strided(entry.sizes, entry.strides, dtype=entry.dtype, device="meta")
        else:
            if entry.member not in storages:
                raw = bytearray(archive.read(entry.member, archive.limits.max_inflated))
                storages[entry.member] = (torch.frombuffer(raw, dtype=entry.dtype) if raw else
                                          torch.empty(0, dtype=entry.dtype))
            storage = storages[entry.member]
            if storage.dtype != entry.dtype:
                raise ProgramError(f"{entry.name} reads {entry.member} as {entry.dtype}, another tensor as "
                                   f"{storage.dtype}")
            tensor = torch.as_strided(storage, entry.sizes, entry.strides, entry.offset)
        if entry.is_param:
            tensor = nn.Parameter(tensor, requires_grad=entry.requires_grad and tensor.is_floating_point())
        tensors[entry.name] = tensor
    return tensors


def check_values(archive: Pt2Archive, entries: list[TensorEntry]) -> None:
    """Refuse inf/NaN in any floating-point storage, streamed in chunks (never the whole file in memory)."""
    seen: set[str] = set()
    for entry in entries:
        if entry.member in seen or not entry.dtype.is_floating_point:
            continue
        seen.add(entry.member)
        itemsize = torch.empty((), dtype=entry.dtype).element_size()
        carry = b""
        for chunk in archive.chunks(entry.member):  # a deflated member may hand back partial values
            data = carry + chunk
            whole = len(data) - len(data) % itemsize
            carry = data[whole:]
            if whole and not torch.frombuffer(bytearray(data[:whole]), dtype=entry.dtype).isfinite().all():
                raise ProgramError(f"{entry.name} holds inf or NaN values")


def parameter_count(entries: list[TensorEntry]) -> int:
    return sum(math.prod(entry.sizes) for entry in entries if entry.is_param)
