"""Uploaded tensors: a `.npz` or `.safetensors` file holding `x` and `y` (optionally `x_val`, `y_val`).

An int64 `x` of shape (N, L) holds token ids for a model.hf model: passed through unchanged (no
normalisation, no cast); `y` is the sequence label, or any integers (ignored) for training.task causal-lm.

Validated before anything trains: keys, dtypes, shapes, label range, finiteness and size, each
failure a DatasetError naming the key. `.npz` is read with allow_pickle=False: never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rigl_core.data.dataset import Dataset, DatasetError, channel_stats, split

MAX_CLASSES = 10_000
ALLOWED_KEYS = {"x", "y", "x_val", "y_val"}


def read_tensor_file(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"dataset.path: {path.name} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetError(f"dataset.path: {size:,} bytes is over the {max_bytes:,}-byte limit")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        elif path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        else:
            raise DatasetError(f"dataset.path: expected a .npz or .safetensors file, got {path.name!r}")
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad upload
        raise DatasetError(f"dataset.path: cannot read {path.name}: {str(exc).splitlines()[0]}") from None
    return arrays


def validate_layout(layout: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    """Check the keys, dtypes and shapes of an upload (from its headers, before any data is read);
    raises DatasetError naming the key."""
    unknown = sorted(set(layout) - ALLOWED_KEYS)
    if unknown:
        raise DatasetError(f"dataset.path: unexpected arrays {unknown}; allowed: x, y, x_val, y_val")
    for key in ("x", "y"):
        if key not in layout:
            raise DatasetError(f"dataset.path: missing array {key!r}")
    if ("x_val" in layout) != ("y_val" in layout):
        raise DatasetError("dataset.path: give both x_val and y_val, or neither")
    for xk, yk in (("x", "y"), ("x_val", "y_val")):
        if xk not in layout:
            continue
        (x_dtype, x_shape), (y_dtype, y_shape) = layout[xk], layout[yk]
        if x_dtype.kind not in "fiu" or x_dtype.fields is not None or x_dtype.subdtype is not None:
            raise DatasetError(f"dataset.{xk}: dtype {x_dtype} is not numeric")
        if not 2 <= len(x_shape) <= 4:
            raise DatasetError(f"dataset.{xk}: expected 2 to 4 dimensions (N, features…), got shape {list(x_shape)}")
        if len(y_shape) != 1 or y_dtype.kind not in "iu" or y_dtype.fields is not None:
            raise DatasetError(f"dataset.{yk}: expected a 1-D integer array of labels, got {y_dtype} {list(y_shape)}")
        if x_shape[0] != y_shape[0]:
            raise DatasetError(f"dataset.{yk}: {y_shape[0]} labels for {x_shape[0]} samples in {xk}")
        if x_shape[0] == 0:
            raise DatasetError(f"dataset.{xk}: no samples")
    if "x_val" in layout and tuple(layout["x_val"][1][1:]) != tuple(layout["x"][1][1:]):
        raise DatasetError(f"dataset.x_val: sample shape {list(layout['x_val'][1][1:])} differs from x's "
                           f"{list(layout['x'][1][1:])}")


def not_finite(key: str) -> DatasetError:
    return DatasetError(f"dataset.{key}: contains NaN or infinite values")


def bad_labels(key: str, low: int, high: int) -> DatasetError | None:
    """The error for labels spanning low..high, or None when they are in range."""
    if low < 0 or high >= MAX_CLASSES:
        return DatasetError(f"dataset.{key}: labels must be in [0, {MAX_CLASSES}), got {low}..{high}")
    return None


def validate_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check an uploaded set of arrays; returns them unchanged or raises DatasetError naming the key."""
    validate_layout({k: (a.dtype, a.shape) for k, a in arrays.items()})
    for xk, yk in (("x", "y"), ("x_val", "y_val")):
        if xk not in arrays:
            continue
        x, y = arrays[xk], arrays[yk]
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise not_finite(xk)
        error = bad_labels(yk, int(y.min()), int(y.max()))
        if error:
            raise error
    return arrays


def tensors_dataset(spec) -> Dataset:
    path = Path(spec.path) if spec.path else None  # `~` is the CLI's to expand, never the service's
    if path is None:
        raise DatasetError("dataset.path: required for tensors")
    if not path.is_absolute() and spec.data_dir:
        path = Path(spec.data_dir) / path
    arrays = validate_arrays(read_tensor_file(path, spec.max_bytes))
    integer_images = arrays["x"].dtype == np.uint8
    # int64 x are token ids (for model.hf models): kept as they are, never normalised or cast to float
    tokens = arrays["x"].dtype == np.int64 and arrays.get("x_val", arrays["x"]).dtype == np.int64
    keep = integer_images or tokens
    x = torch.from_numpy(np.ascontiguousarray(arrays["x"]))
    y = torch.from_numpy(arrays["y"].astype(np.int64))
    if not keep:
        x = x.float()
    if "x_val" in arrays:
        xv = torch.from_numpy(np.ascontiguousarray(arrays["x_val"]))
        xv = xv if keep else xv.float()
        xt, yt, yv = x, y, torch.from_numpy(arrays["y_val"].astype(np.int64))
    else:
        xt, yt, xv, yv = split(x, y, spec.val_fraction, spec.split_seed)
    num_classes = int(max(yt.max(), yv.max())) + 1
    if tokens:
        if int(min(xt.min(), xv.min())) < 0:
            raise DatasetError("dataset.x: token ids (int64) must be ≥ 0")
        return Dataset(xt, yt, xv, yv, num_classes=max(2, num_classes), tokens=True)
    scale = 1 / 255 if integer_images else 1.0
    mean, std = channel_stats(xt, scale) if spec.normalize else (None, None)
    augment = spec.augment == "crop-flip"
    return Dataset(xt, yt, xv, yv, num_classes=max(2, num_classes), scale=scale, mean=mean, std=std, augment=augment)
