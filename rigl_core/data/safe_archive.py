"""Inspect an uploaded `.npz` or `.safetensors` file without inflating it.

Why: `np.load` inflates every member of an `.npz` in full, so a 1 MB zip of zeros that declares
1 GiB costs 1 GiB of memory in whatever process reads it. The service's API reads uploads only
through here: first the headers (the zip's end record and central directory, each member's `.npy`
header, the safetensors JSON header), refusing declared sizes over a budget, absurd compression
ratios and headers that disagree with each other; then each array is streamed in small chunks to
check its values (finite, labels in range) and that its real size equals the declared one. No more
than about `CHUNK` bytes of array data are held at once, whatever the file declares.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib import format as npy_format

from rigl_core.data.dataset import DatasetError
from rigl_core.data.tensors import ALLOWED_KEYS, bad_labels, not_finite, validate_layout
from rigl_core.data.zip_directory import directory_size, member_problem

CHUNK = 1 << 20  # bytes of array data read at a time
MAX_MEMBERS = 8  # an upload holds at most x, y, x_val, y_val
MAX_DIRECTORY_BYTES = 64 * 1024  # central directory: parsed into Python objects, so bounded first
MAX_NPY_HEADER = 10_000  # numpy's own default
MAX_SAFETENSORS_HEADER = 1 << 20
RATIO_FLOOR = 1 << 20  # members inflating to less than this are never refused for their ratio
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                      "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
LABEL_KEYS = ("y", "y_val")


@dataclass
class TensorSummary:
    """What the service records about an upload, learnt from headers and one streamed pass."""

    layout: dict[str, tuple[np.dtype, tuple[int, ...]]]
    label_max: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.layout["x"][1][0])

    @property
    def num_val(self) -> int:
        return int(self.layout["x_val"][1][0]) if "x_val" in self.layout else 0

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.layout["x"][1][1:]]

    @property
    def num_classes(self) -> int:
        return max(2, max(self.label_max.values()) + 1)


def inspect_tensor_file(path: Path, max_inflated: int, max_ratio: float) -> TensorSummary:
    """Validate an upload as `read_tensor_file` + `validate_arrays` would, in bounded memory.
    Raises DatasetError naming the field; messages carry no server path."""
    try:
        if path.suffix == ".npz":
            return _inspect_npz(path, max_inflated, max_ratio)
        if path.suffix == ".safetensors":
            return _inspect_safetensors(path, max_inflated)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad upload
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"dataset.path: cannot read the file: {reason}") from None
    raise DatasetError("dataset.path: expected a .npz or .safetensors file")


# ---------------------------------------------------------------- .npz
def _inspect_npz(path: Path, max_inflated: int, max_ratio: float) -> TensorSummary:
    size = path.stat().st_size
    with open(path, "rb") as f:
        entries, directory_bytes = _end_record(f, size)
    if entries > MAX_MEMBERS or directory_bytes > MAX_DIRECTORY_BYTES:
        raise DatasetError(f"dataset.path: the archive lists {entries:,} members in {directory_bytes:,} bytes; "
                           f"an upload holds at most {MAX_MEMBERS} arrays")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise DatasetError("dataset.path: the archive names a member twice")
        unknown = sorted(n.removesuffix(".npy") for n in names if not (n.endswith(".npy") and n[:-4] in ALLOWED_KEYS))
        if unknown:
            raise DatasetError(f"dataset.path: unexpected arrays {unknown}; allowed: x, y, x_val, y_val")
        inflated = sum(info.file_size for info in infos)
        if inflated > max_inflated:
            raise DatasetError(f"dataset.path: the arrays inflate to {inflated:,} bytes, over the "
                               f"{max_inflated:,}-byte limit")
        for info in infos:
            problem = member_problem(info, max_ratio, RATIO_FLOOR)
            if problem is not None and "compression" in problem:
                raise DatasetError(f"dataset.path: {problem}; use np.savez or np.savez_compressed")
            if problem is not None:
                raise DatasetError(f"dataset.path: {problem}")
        headers = {}
        for info in infos:  # pass 1: headers only, checked against the zip's declared sizes
            with archive.open(info) as member:
                dtype, shape, offset = _npy_header(member, info.filename)
            if offset + math.prod(shape) * dtype.itemsize != info.file_size:
                raise DatasetError(f"dataset.path: {info.filename}'s header declares shape {list(shape)} of {dtype}, "
                                   f"which does not match its size in the archive")
            headers[info.filename[:-4]] = (info, dtype, shape, offset)
        layout = {key: (dtype, shape) for key, (_, dtype, shape, _) in headers.items()}
        validate_layout(layout)
        summary = TensorSummary(layout)
        for key, (info, dtype, shape, offset) in headers.items():  # pass 2: values, streamed
            with archive.open(info) as member:
                _read_exact(member.read, offset, info.filename)
                _stream_values(key, dtype, math.prod(shape), member.read, summary)
                if member.read(1):
                    raise DatasetError(f"dataset.path: {info.filename} holds more data than its header declares")
    return summary


def _end_record(f, size: int) -> tuple[int, int]:
    """(members, central-directory bytes), read before zipfile parses the directory
    (rigl_core/data/zip_directory.py)."""
    try:
        return directory_size(f, size)
    except ValueError as exc:
        reason = str(exc)
        raise DatasetError(f"dataset.path: {'not a zip archive (.npz)' if reason == 'not a zip archive' else reason}"
                           ) from None


def _npy_header(member, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, bytes before the data) of a .npy stream; never unpickles, never reads the data."""
    try:
        version = npy_format.read_magic(member)
        if version == (1, 0):
            shape, _fortran, dtype = npy_format.read_array_header_1_0(member, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, _fortran, dtype = npy_format.read_array_header_2_0(member, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise DatasetError(f"dataset.path: {name} is not a valid .npy array: {str(exc).splitlines()[0]}") from None
    if dtype.hasobject:
        raise DatasetError(f"dataset.path: {name} holds Python objects (needs pickle); not accepted")
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise DatasetError(f"dataset.path: {name} declares an invalid shape {list(shape)}")
    return dtype, tuple(int(d) for d in shape), member.tell()


# ---------------------------------------------------------------- .safetensors
def _inspect_safetensors(path: Path, max_inflated: int) -> TensorSummary:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DatasetError("dataset.path: not a safetensors file (shorter than its 8-byte header length)")
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > MAX_SAFETENSORS_HEADER:
            raise DatasetError(f"dataset.path: the safetensors header declares {header_bytes:,} bytes, over the "
                               f"{MAX_SAFETENSORS_HEADER:,}-byte limit")
        if 8 + header_bytes > size:
            raise DatasetError("dataset.path: the safetensors header runs past the end of the file")
        try:
            header = json.loads(f.read(header_bytes))
        except (ValueError, RecursionError):
            raise DatasetError("dataset.path: the safetensors header is not valid JSON") from None
        if not isinstance(header, dict):
            raise DatasetError("dataset.path: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_bytes = size - 8 - header_bytes
        if data_bytes > max_inflated:
            raise DatasetError(f"dataset.path: the arrays hold {data_bytes:,} bytes, over the "
                               f"{max_inflated:,}-byte limit")
        tensors = {key: _safetensors_entry(key, entry) for key, entry in header.items()}
        position = 0
        for key, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
            if begin != position:
                raise DatasetError(f"dataset.path: tensor {key!r} does not start where the previous one ends")
            position = end
        if position != data_bytes:
            raise DatasetError(f"dataset.path: the tensors cover {position:,} bytes but the file holds {data_bytes:,}")
        layout = {key: (dtype, shape) for key, (dtype, shape, _, _) in tensors.items()}
        validate_layout(layout)
        summary = TensorSummary(layout)
        for key, (dtype, shape, begin, _) in tensors.items():
            f.seek(8 + header_bytes + begin)
            _stream_values(key, dtype, math.prod(shape), f.read, summary)
    return summary


def _safetensors_entry(key: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if key not in ALLOWED_KEYS:
        raise DatasetError(f"dataset.path: unexpected arrays [{key!r}]; allowed: x, y, x_val, y_val")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise DatasetError(f"dataset.{key}: bad safetensors entry")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise DatasetError(f"dataset.{key}: dtype {str(entry['dtype'])[:20]} is not supported")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise DatasetError(f"dataset.{key}: bad shape in the safetensors header")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 2**63 for o in offsets) or offsets[0] > offsets[1]):
        raise DatasetError(f"dataset.{key}: bad data_offsets in the safetensors header")
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise DatasetError(f"dataset.{key}: data_offsets do not match shape {shape} of {entry['dtype']}")
    return dtype, tuple(shape), offsets[0], offsets[1]


# ---------------------------------------------------------------- values, streamed
def _read_exact(read: Callable[[int], bytes], n: int, name: str) -> bytes:
    parts, left = [], n
    while left:
        data = read(min(left, CHUNK))
        if not data:
            raise DatasetError(f"dataset.path: {name} holds less data than its header declares")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def _stream_values(key: str, dtype: np.dtype, count: int, read: Callable[[int], bytes],
                   summary: TensorSummary) -> None:
    """Check `count` values read in CHUNK-sized pieces: finite for x, labels in range for y."""
    per_chunk = max(1, CHUNK // dtype.itemsize)
    low, high = None, None
    while count:
        n = min(per_chunk, count)
        values = np.frombuffer(_read_exact(read, n * dtype.itemsize, key), dtype=dtype)
        if key in LABEL_KEYS:
            low = int(values.min()) if low is None else min(low, int(values.min()))
            high = int(values.max()) if high is None else max(high, int(values.max()))
        elif dtype.kind == "f" and not np.isfinite(values).all():
            raise not_finite(key)
        count -= n
    if key in LABEL_KEYS and low is not None:
        error = bad_labels(key, low, high)
        if error:
            raise error
        summary.label_max[key] = high
