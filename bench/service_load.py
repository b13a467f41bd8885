"""Service benchmark: API latency and submission throughput with a worker busy training.

Starts `rigl serve` (uvicorn + one Celery worker, embedded SQLite + filesystem broker) on
loopback, then:
1. training speed: the same job through the service and through `rigl train`, interleaved, 3×;
2. with one long job training: `wrk` with 50 connections for 30 s on GET /v1/jobs/{id}, then on
   POST /v1/jobs (a small valid JobSpec) — p50/p99 latency and requests per second.
Loopback only; bounded in time. Needs `wrk` (Debian package).

    python bench/service_load.py
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.service import free_port, wait_for  # noqa: E402

SPEED_JOB = {"model": {"name": "mlp"}, "dataset": {"name": "digits"},
             "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk"},
             "training": {"epochs": 200, "batch_size": 64, "log_every_steps": 10}}
SMALL_JOB = {"model": {"name": "mlp"}, "dataset": {"name": "digits"},
             "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk"},
             "training": {"epochs": 2, "batch_size": 64}}
BUSY_JOB = {**SPEED_JOB, "training": {"epochs": 100_00, "batch_size": 64}}


def wait_job(base: str, job_id: str, timeout: float = 600) -> dict:
    def done():
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, interval=0.5, what=job_id)


def rigl_train_seconds(tmp: Path) -> float:
    spec = tmp / "speed.json"
    spec.write_text(json.dumps(SPEED_JOB))
    out = tmp / f"cli-{time.time_ns()}"
    subprocess.run([sys.executable, "-m", "rigl_core.cli", "train", "--config", str(spec), "--out", str(out),
                    "--no-progress"], check=True, capture_output=True)
    return json.loads((out / "report.json").read_text())["train_seconds"]


def parse_wrk(text: str) -> dict:
    def to_ms(value: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
        return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    latency = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", text, flags=re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return {"p50_ms": to_ms(latency["50"]), "p99_ms": to_ms(latency["99"]), "rps": rps,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def main() -> None:
    if not shutil.which("wrk"):
        sys.exit("needs wrk: apt-get install -y wrk")
    tmp = Path(tempfile.mkdtemp(prefix="rigl-load-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    env["RIGL_MAX_ACTIVE_JOBS_PER_OWNER"] = "1000000"  # measure throughput, not the per-owner limit
    server = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "serve", "--port", str(port), "--data-dir",
                               str(tmp / "data")], env=env, stdout=open(tmp / "serve.log", "wb"),
                              stderr=subprocess.STDOUT, cwd=ROOT)
    results: dict = {}
    try:
        wait_for(lambda: _ready(base), 60, what="rigl serve")
        # 1. training speed, service vs rigl train, interleaved
        service_s, cli_s = [], []
        for _ in range(5):
            job = httpx.post(f"{base}/v1/jobs", json=SPEED_JOB, timeout=30).json()
            service_s.append(wait_job(base, job["id"])["result"]["train_seconds"])
            cli_s.append(rigl_train_seconds(tmp))
            print(f"speed: service {service_s[-1]:.2f}s, rigl train {cli_s[-1]:.2f}s", flush=True)
        results["speed"] = {"service_seconds": service_s, "cli_seconds": cli_s,
                            "ratio": statistics.median(s / c for s, c in zip(service_s, cli_s))}
        # 2. load with a busy worker
        busy = httpx.post(f"{base}/v1/jobs", json=BUSY_JOB, timeout=30).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/jobs/{busy}", timeout=30).json()["progress"]["step"] > 50, 120,
                 what="the busy job to train")
        step_before = httpx.get(f"{base}/v1/jobs/{busy}").json()["progress"]["step"]
        t0 = time.monotonic()
        get = subprocess.run(["wrk", "-t2", "-c50", "-d30s", "--latency", f"{base}/v1/jobs/{busy}"],
                             capture_output=True, text=True, check=True).stdout
        results["get"] = parse_wrk(get)
        print(get, flush=True)
        script = tmp / "post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = [[{json.dumps(SMALL_JOB)}]]\n")
        post = subprocess.run(["wrk", "-t2", "-c50", "-d30s", "--latency", "-s", str(script), f"{base}/v1/jobs"],
                              capture_output=True, text=True, check=True).stdout
        results["post"] = parse_wrk(post)
        print(post, flush=True)
        elapsed = time.monotonic() - t0
        busy_job = httpx.get(f"{base}/v1/jobs/{busy}").json()
        results["busy_job"] = {"status": busy_job["status"], "steps_during_load": busy_job["progress"]["step"] - step_before,
                               "seconds": elapsed}
        httpx.post(f"{base}/v1/jobs/{busy}/cancel", timeout=30)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    write(results)
    shutil.rmtree(tmp, ignore_errors=True)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def write(results: dict) -> None:
    import torch

    g, p, s = results["get"], results["post"], results["speed"]
    lines = [
        "# Service load: latency and throughput with a worker busy training",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. `rigl serve` (uvicorn, 1 process; SQLite; kombu filesystem broker; one "
        "Celery worker training an MLP on digits the whole time). Load: `wrk -t2 -c50 -d30s` on loopback, "
        "sharing the 2 cores with the server and the training worker.",
        "",
        "| request | p50 | p99 | requests/s | non-2xx | target |",
        "|---|---|---|---|---|---|",
        f"| GET /v1/jobs/{{id}} | {g['p50_ms']:.1f} ms | {g['p99_ms']:.1f} ms | {g['rps']:.0f} | {g['non_2xx']} | "
        "p99 < 50 ms |",
        f"| POST /v1/jobs | {p['p50_ms']:.1f} ms | {p['p99_ms']:.1f} ms | {p['rps']:.0f} | {p['non_2xx']} | "
        "≥ 200 submissions/s |",
        "",
        f"Busy job during the 60 s of load: {results['busy_job']['steps_during_load']} training steps, status "
        f"{results['busy_job']['status']}.",
        "",
        f"Training speed, same job (MLP 300-100, digits, RigL 90% ERK, 200 epochs) through the service vs `rigl "
        f"train`, interleaved, 5 repeats: train_seconds service {', '.join(f'{x:.2f}' for x in s['service_seconds'])}"
        f" vs CLI {', '.join(f'{x:.2f}' for x in s['cli_seconds'])}; median ratio **{s['ratio']:.3f}×** "
        "(target within 10%).",
    ]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "service_load.md").write_text("\n".join(lines) + "\n")
    (out / "service_load.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
