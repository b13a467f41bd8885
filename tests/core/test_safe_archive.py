"""Header-first inspection of uploads (rigl_core.data.safe_archive): the same verdicts and messages
as loading the arrays, without inflating them. The server-process bomb tests are in test_upload_bombs.py."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from rigl_core.data.dataset import DatasetError
from rigl_core.data.safe_archive import CHUNK, inspect_tensor_file
from rigl_core.data.tensors import read_tensor_file, validate_arrays

INT = np.int64
CASES = [
    ({"x": np.zeros((4, 3))}, "missing array 'y'"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(5, INT)}, "dataset.y: 5 labels for 4 samples"),
    ({"x": np.zeros((4, 3)), "y": np.array([0, 1, -1, 2])}, "dataset.y: labels must be"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(4, np.float32)}, "dataset.y: expected a 1-D integer"),
    ({"x": np.full((4, 3), np.nan), "y": np.zeros(4, INT)}, "dataset.x: contains NaN"),
    ({"x": np.zeros(4), "y": np.zeros(4, INT)}, "dataset.x: expected 2 to 4 dimensions"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(4, INT), "x_val": np.zeros((2, 5)), "y_val": np.zeros(2, INT)},
     "dataset.x_val: sample shape"),
    ({"x": np.zeros((4, 3)), "y": np.zeros(4, INT), "w": np.zeros(1)}, "unexpected arrays ['w']"),
    ({"x": np.zeros((4, 3), np.complex64), "y": np.zeros(4, INT)}, "dataset.x: dtype complex64 is not numeric"),
]


@pytest.mark.parametrize("fmt,arrays,message", [("npz", a, m) for a, m in CASES] + [
    ("safetensors", a, m) for a, m in CASES if all(v.dtype.kind != "c" for v in a.values())])  # no complex there
def test_same_verdicts_as_loading_the_arrays(tmp_path, fmt, arrays, message):
    path = tmp_path / f"d.{fmt}"
    if fmt == "npz":
        np.savez_compressed(path, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    with pytest.raises(DatasetError) as loaded:
        validate_arrays(read_tensor_file(path, 10**9))
    with pytest.raises(DatasetError) as inspected:
        inspect_tensor_file(path, max_inflated=10**9, max_ratio=100)
    assert message in str(loaded.value) and message in str(inspected.value)


def test_summary_matches_the_arrays_across_many_chunks(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3 * CHUNK // 24 + 5, 6)).astype(np.float32)  # x spans several chunks
    y = rng.integers(0, 7, len(x))
    y[-1] = 11  # the largest label is in the last chunk
    np.savez(tmp_path / "d.npz", x=x, y=y, x_val=x[:9], y_val=y[:9])
    summary = inspect_tensor_file(tmp_path / "d.npz", max_inflated=10**9, max_ratio=100)
    assert (summary.num_samples, summary.num_val, summary.input_shape, summary.num_classes) == (len(x), 9, [6], 12)
    x[-1, -1] = np.inf  # the one bad value is the last one
    np.savez(tmp_path / "e.npz", x=x, y=y)
    with pytest.raises(DatasetError, match="dataset.x: contains NaN or infinite"):
        inspect_tensor_file(tmp_path / "e.npz", max_inflated=10**9, max_ratio=100)


def test_archive_structure_is_bounded_before_zipfile_parses_it(tmp_path):
    path = tmp_path / "many.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(20):
            archive.writestr(f"m{i}.npy", b"")
    with pytest.raises(DatasetError, match="lists 20 members"):
        inspect_tensor_file(path, max_inflated=10**9, max_ratio=100)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(tmp_path / "dup.npz", "w") as archive:
        archive.writestr("x.npy", b"")
        archive.writestr("x.npy", b"")
    with pytest.raises(DatasetError, match="names a member twice"):
        inspect_tensor_file(tmp_path / "dup.npz", max_inflated=10**9, max_ratio=100)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as archive:
        archive.write(tmp_path / "objects.npy", "x.npy")
    with pytest.raises(DatasetError, match="Python objects"):
        inspect_tensor_file(tmp_path / "pickled.npz", max_inflated=10**9, max_ratio=100)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match="not a zip archive"):
        inspect_tensor_file(tmp_path / "junk.npz", max_inflated=10**9, max_ratio=100)
