"""Artifact upload/download throughput: the local folder store versus an S3-protocol server.

Why: with RIGL_ARTIFACT_URL a worker uploads every checkpoint and export and downloads its inputs;
this measures what that costs per MB against the local folder (a file copy). The S3 server is moto's
standalone server (pure Python, started here on 127.0.0.1): a protocol-faithful stand-in, not a
real S3 or MinIO, so its figures are a floor for the client path, not a forecast for a real bucket.

    python bench/artifact_throughput.py [--repeats 5] [--out bench/results/artifact_throughput.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from store.object_store import LocalStore, S3Store  # noqa: E402

MiB = 1024 * 1024
SIZES = (4 * MiB, 64 * MiB)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            return process, endpoint
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure(store, source: Path, scratch: Path, repeats: int) -> dict[str, float]:
    """Median MB/s (MiB/s) over `repeats` runs of upload (put_file), download (get_file to a file) and
    streamed read (open_chunks, what the API's download route sends)."""
    size = source.stat().st_size
    key = f"jobs/job_bench/{source.name}"
    up, down, stream = [], [], []
    for i in range(repeats):
        up.append(timed(lambda: store.put_file(key, source)))
        dest = scratch / f"down-{i}"
        down.append(timed(lambda: store.get_file(key, dest)))
        dest.unlink()

        def read_all() -> None:
            _, chunks = store.open_chunks(key)
            for _ in chunks:
                pass

        stream.append(timed(read_all))
    store.delete(key)
    return {name: size / MiB / statistics.median(times) for name, times in
            (("upload", up), ("download", down), ("stream", stream))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "artifact_throughput.md")
    args = parser.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    process, endpoint = start_moto()
    rows = []
    try:
        import boto3

        bucket = f"rigl-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            stores = {"local folder": LocalStore(tmp / "store"), "S3 (moto server)": S3Store(bucket, "bench",
                                                                                            endpoint_url=endpoint)}
            for size in SIZES:
                source = tmp / f"artifact-{size // MiB}MiB.bin"
                source.write_bytes(os.urandom(size))
                for name, store in stores.items():
                    result = measure(store, source, tmp, args.repeats)
                    rows.append((size // MiB, name, result))
                    print(f"{size // MiB:>3} MiB  {name:<18} " +
                          "  ".join(f"{k} {v:8.1f} MiB/s" for k, v in result.items()), flush=True)
    finally:
        process.terminate()
        process.wait(10)
    write_markdown(args.out, rows, args.repeats)


def write_markdown(path: Path, rows, repeats: int) -> None:
    import boto3
    import moto

    lines = [
        "# Artifact throughput: local folder vs S3 protocol",
        "",
        "`python bench/artifact_throughput.py` — median of "
        f"{repeats} runs per cell, MiB/s (higher is better). Machine: {platform.machine()} Linux VM, "
        f"{os.cpu_count()} cores shared with other work, no GPU; Python {platform.python_version()}, "
        f"boto3 {boto3.__version__}, moto {moto.__version__}.",
        "",
        "- **upload**: `put_file` (local: a file copy into the store folder; S3: boto3's managed "
        "transfer, multipart from 64 MiB in 64 MiB parts, 4 threads).",
        "- **download**: `get_file` into a node's cache (what a worker does for inputs and a resume checkpoint).",
        "- **stream**: `open_chunks` read in 1 MiB chunks (what `GET /v1/jobs/{id}/checkpoint` sends).",
        "",
        "| size | store | upload | download | stream |",
        "|---:|---|---:|---:|---:|",
    ]
    for size, name, result in rows:
        lines.append(f"| {size} MiB | {name} | {result['upload']:.0f} | {result['download']:.0f} | "
                     f"{result['stream']:.0f} |")
    lines += [
        "",
        "The S3 server here is moto's standalone server: a single-process Python (Flask/werkzeug) "
        "emulation of the S3 protocol on 127.0.0.1, holding objects in memory. It checks the protocol "
        "(signatures, multipart, ranged GETs) but its speed says little about a real bucket: MinIO or "
        "AWS S3 are limited by the network and their disks, not by a Python request handler. Read the "
        "S3 rows as the cost of the client path on this machine, an upper bound on the overhead the "
        "protocol adds here; with the local default (no `RIGL_ARTIFACT_URL`) workers write in place "
        "and nothing is copied at all. The local rows read files just written, so from the page cache.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
