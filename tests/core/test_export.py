"""Exports: dense safetensors loads into the plain model; the packed file round-trips exactly."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.specs import small_spec
from rigl_core.export.packed import load_packed
from rigl_core.models.registry import build_model
from rigl_core.export.pipeline import DENSE_EXPORT, PACKED_EXPORT, REPORT
from rigl_core.training.run import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    spec = small_spec(model__name="lenet5", model__hidden_sizes=None, sparsity__sparsity=0.8)
    report = run_training(spec, out)
    return spec, out, report


def test_dense_export_loads_strict_into_plain_model(trained):
    spec, out, report = trained
    model = build_model("lenet5", 10, [1, 8, 8])  # the unmodified model
    state = load_file(str(out / DENSE_EXPORT))
    model.load_state_dict(state, strict=True)
    # sparsity in the file equals the report, layer by layer
    for row in report["layers"]:
        weight = state[f"{row['name']}.weight"]
        assert int(torch.count_nonzero(weight)) <= row["nnz"]
        assert int(torch.count_nonzero(weight)) >= row["nnz"] * 0.95  # a few grown weights may still be ~0
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 10)


def test_packed_roundtrip_is_identical(trained):
    _, out, report = trained
    dense = load_file(str(out / DENSE_EXPORT))
    unpacked = load_packed(out / PACKED_EXPORT)
    assert dense.keys() == unpacked.keys()
    for name in dense:
        assert dense[name].dtype == unpacked[name].dtype
        assert torch.equal(dense[name], unpacked[name]), name
    packed_size = (out / PACKED_EXPORT).stat().st_size
    dense_size = (out / DENSE_EXPORT).stat().st_size
    assert packed_size < dense_size * 0.5  # 80% sparse: values + 1 bit per weight


def read_packed_with_numpy(path):
    """docs/guide/exports.md's reader, verbatim: safetensors header + numpy, no torch, no safetensors package."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    dtypes = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "U8": np.uint8}
    meta = json.loads(header.pop("__metadata__")["rigl"])
    raw = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw[name] = np.frombuffer(data[begin:end], dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    tensors = {}
    for name, info in meta["tensors"].items():
        mask = np.unpackbits(raw.pop(name + ".mask"), count=int(np.prod(info["shape"])), bitorder="little")
        dense = np.zeros(mask.size, dtype=raw[name + ".values"].dtype)
        dense[mask.astype(bool)] = raw.pop(name + ".values")
        tensors[name] = dense.reshape(info["shape"])
    tensors.update(raw)
    return tensors


def test_packed_format_readable_with_numpy_alone(trained):
    _, out, _ = trained
    dense = load_file(str(out / DENSE_EXPORT))
    arrays = read_packed_with_numpy(out / PACKED_EXPORT)
    assert set(arrays) == set(dense)
    for name, tensor in dense.items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy())


def test_report_file_has_required_fields(trained):
    _, out, _ = trained
    report = json.loads((out / REPORT).read_text())
    for row in report["layers"]:
        assert {"name", "shape", "params", "nnz", "density", "target_density", "flops_dense",
                "flops_sparse"} <= row.keys()
    assert {"sparsity", "inference_flops_ratio", "training_flops_ratio"} <= report["totals"].keys()
    assert {"final_metrics", "train_seconds", "steps", "leak_check", "spec"} <= report.keys()
    assert report["leak_check"] == {"ok": True, "leaked": {}}


def test_exports_get_the_same_mode_as_the_other_output_files(trained):
    """safetensors alone writes 0600; exports follow the umask like report.json (0644 under 022)."""
    import os
    import stat

    _, out, _ = trained
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    current = os.umask(0o022)
    os.umask(current)
    assert modes[DENSE_EXPORT] == modes[PACKED_EXPORT] == modes[REPORT] == 0o666 & ~current


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_export_mode_respects_the_umask(tmp_path, umask):
    import os
    import stat

    from rigl_core.export.packed import save_dense, save_packed

    model = torch.nn.Linear(4, 2)
    previous = os.umask(umask)
    try:
        dense = save_dense(model, tmp_path / "d.safetensors")
        packed = save_packed(model, {"weight": torch.ones(2, 4, dtype=torch.bool)}, tmp_path / "p.safetensors")
    finally:
        os.umask(previous)
    for path in (dense, packed):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
