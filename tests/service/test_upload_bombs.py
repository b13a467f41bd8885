"""Uploads that would inflate inside the API (issue 11, item 2), sent to a real `rigl serve` process.

A 1 MB .npz that declares 1 GiB of zeros must be refused from its headers, without the API process's
memory growing; lying headers and huge safetensors headers are refused with a reason; a valid upload
still works and trains. How fast a refusal is (milliseconds) is printed for bench/reliability_report.py,
not asserted: a loaded machine makes any time limit a coin toss.
"""

from __future__ import annotations

import io
import json
import statistics
import struct
import time
import zipfile
import zlib

import httpx
import numpy as np
import pytest
from numpy.lib import format as npy_format

from helpers.service import JOB, serve_process

# One worker runs the module: its API processes (the module fixtures) start once, not once per xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("upload-bombs")]
OCTET = {"Content-Type": "application/octet-stream"}


def write_bomb(path, gib: int = 1) -> None:
    """An .npz whose x.npy inflates to `gib` GiB of zeros (about 1 MB per GiB on disk), written in
    1 MiB pieces so building it never holds the inflated array."""
    rows = gib * 1024
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w") as f:
            npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 262_144)})
            zeros = bytes(1 << 20)
            for _ in range(rows):
                f.write(zeros)
        with archive.open("y.npy", "w") as f:
            npy_format.write_array(f, np.zeros(rows, np.int64))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rigl serve --no-worker` (the API alone, embedded defaults) as its own process: (url, pid)."""
    data_dir = tmp_path_factory.mktemp("bombs")
    with serve_process(data_dir, args=("--no-worker",)) as (url, process):
        with httpx.Client(base_url=url, timeout=60) as client:
            client.pid, client.data_dir = process.pid, data_dir
            yield client


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    write_bomb(path)
    return path.read_bytes()


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_zip_bomb_is_refused_from_its_headers_in_bounded_memory(server, bomb):
    assert len(bomb) < 1.2e6
    with zipfile.ZipFile(io.BytesIO(bomb)) as archive:
        assert archive.getinfo("x.npy").file_size > 2**30  # declares over 1 GiB
    seconds, rss_growth, peak_growth = [], [], []
    for attempt in range(3):
        before = memory_kib(server.pid)
        start = time.perf_counter()
        response = server.post(f"/v1/datasets?name=bomb{attempt}&format=npz", content=bomb, headers=OCTET)
        seconds.append(time.perf_counter() - start)
        after = memory_kib(server.pid)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "dataset.path" and "inflates" in error["message"], error
        rss_growth.append((after["VmRSS"] - before["VmRSS"]) / 1024)
        peak_growth.append((after["VmHWM"] - before["VmHWM"]) / 1024)
    print(f"\nreliability: zip bomb: 1 MB upload declaring 1 GiB -> 4xx in {statistics.median(seconds):.3f} s (median of 3: {[round(s, 3) for s in seconds]}); "
          f"API RSS growth {statistics.median(rss_growth):.1f} MiB, peak-RSS growth "
          f"{statistics.median(peak_growth):.1f} MiB")
    assert max(peak_growth) < 100  # the peak, not only what is left: nothing was ever inflated
    assert server.get("/v1/datasets").json()["data"] == []
    assert not list((server.data_dir / "artifacts" / "datasets").glob("*"))  # the temp file is gone


def test_bomb_under_the_ratio_limit_is_refused_by_the_inflated_budget(tmp_path):
    """Direct check of the other guard: declared inflated size over the budget, ratio never reached."""
    from rigl_core.data.dataset import DatasetError
    from rigl_core.data.safe_archive import inspect_tensor_file

    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((64, 1024), np.float32), y=np.zeros(64, np.int64))  # stored: ratio 1
    with pytest.raises(DatasetError, match="inflate to .* over the 100,000-byte limit"):
        inspect_tensor_file(path, max_inflated=100_000, max_ratio=100)
    assert inspect_tensor_file(path, max_inflated=10**6, max_ratio=100).num_samples == 64


def _lying_npz() -> bytes:
    """x.npy's .npy header declares 140×8 float32 and the zip directory agrees (4,608 bytes), but the
    deflate stream holds only 10×8 values: the real data is shorter than both headers claim."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (140, 8)})
    real = header.getvalue() + np.ones((10, 8), np.float32).tobytes()
    declared = len(header.getvalue()) + 140 * 8 * 4
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", real)
        y = io.BytesIO()
        npy_format.write_array(y, np.zeros(140, np.int64))
        archive.writestr("y.npy", y.getvalue())
    data = bytearray(buffer.getvalue())
    crc = zlib.crc32(real)
    # patch x.npy's uncompressed size in its local header (offset 22) and central directory entry (offset 24)
    local = data.index(b"PK\x03\x04")
    assert struct.unpack_from("<L", data, local + 14)[0] == crc
    struct.pack_into("<L", data, local + 22, declared)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, declared)
    return bytes(data)


def _safetensors(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


HOSTILE_HEADERS = [
    ("lying-npz", "npz", _lying_npz(), "holds less data than its header declares"),
    ("shape-vs-size", "npz", None, "does not match its size"),
    ("huge-header", "safetensors", _safetensors(b"{}", header_len=2**40), "over the 1,048,576-byte limit"),
    ("big-header", "safetensors", _safetensors(b" " * (2 << 20)), "over the 1,048,576-byte limit"),
    ("offsets-past-end", "safetensors", _safetensors(
        {"x": {"dtype": "F32", "shape": [2**20, 1024], "data_offsets": [0, 2**32]},
         "y": {"dtype": "I64", "shape": [2**20], "data_offsets": [2**32, 2**32 + 2**23]}}, b"\0" * 64),
     "the tensors cover"),
    ("bf16", "safetensors", _safetensors({"x": {"dtype": "BF16", "shape": [1, 1], "data_offsets": [0, 2]}}, b"\0\0"),
     "dtype BF16 is not supported"),
]


# Ids are the names: the bodies hold zip timestamps, and test ids must be the same in every pytest-xdist worker.
@pytest.mark.parametrize("name,fmt,body,expected", HOSTILE_HEADERS, ids=[case[0] for case in HOSTILE_HEADERS])
def test_lying_and_oversized_headers_are_refused_with_a_reason(server, name, fmt, body, expected):
    if body is None:  # the .npy header says 100,000×1,000 float32; the zip holds 80 values
        header = io.BytesIO()
        npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**5, 1000)})
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("x.npy", header.getvalue() + bytes(320))
            y = io.BytesIO()
            npy_format.write_array(y, np.random.default_rng(0).integers(0, 10, 10**5))
            archive.writestr("y.npy", y.getvalue())
        body = buffer.getvalue()
    before = memory_kib(server.pid)["VmHWM"]
    response = server.post(f"/v1/datasets?name={name}&format={fmt}", content=body, headers=OCTET)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert expected in error["message"] and error["field"].startswith("dataset."), error
    assert str(server.data_dir) not in error["message"] and "/tmp" not in error["message"]  # no server path
    assert (memory_kib(server.pid)["VmHWM"] - before) / 1024 < 100


def test_valid_uploads_still_work_and_values_are_checked_streamed(server):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4, 6)).astype(np.float32)
    y = rng.integers(0, 5, 300)
    response = server.post("/v1/datasets?name=ok&format=npz", content=npz_bytes(x=x, y=y), headers=OCTET)
    assert response.status_code == 201, response.text
    ds = response.json()
    assert (ds["num_samples"], ds["input_shape"], ds["num_classes"]) == (300, [4, 6], 5)
    job = server.post("/v1/jobs", json={**JOB, "dataset": {"name": "tensors", "path": ds["id"]}})
    assert job.status_code == 201, job.text

    from safetensors.numpy import save

    body = save({"x": x, "y": y.astype(np.int64), "x_val": x[:7], "y_val": np.full(7, 9, np.int64)})
    response = server.post("/v1/datasets?name=st&format=safetensors", content=body, headers=OCTET)
    assert response.status_code == 201, response.text
    assert (response.json()["num_val"], response.json()["num_classes"]) == (7, 10)

    nan = x.copy()
    nan[299, 3, 5] = np.nan  # in the last value: every chunk is read
    response = server.post("/v1/datasets?name=nan", content=npz_bytes(x=nan, y=y), headers=OCTET)
    assert response.status_code == 422 and response.json()["error"]["field"] == "dataset.x"
    bad = y.copy()
    bad[-1] = -1
    response = server.post("/v1/datasets?name=neg", content=npz_bytes(x=x, y=bad), headers=OCTET)
    assert response.status_code == 422 and response.json()["error"]["field"] == "dataset.y"
