"""Helpers for the service tests: real PostgreSQL databases, Redis queues, worker and server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("RIGL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("RIGL_TEST_REDIS", "redis://127.0.0.1:6379/0")

JOB = {"model": {"name": "mlp"}, "dataset": {"name": "digits"},
       "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk"},
       "training": {"epochs": 2, "batch_size": 64}}


def job_history(api, job_id: str) -> tuple[list[str], list[int], list[dict]]:
    """(its status sequence, the steps it resumed from, all its events), from a job's event log."""
    events = api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    resumed = [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in (e["data"] or {})]
    return statuses, resumed, events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_timeout=3).ping())
    except Exception:  # noqa: BLE001
        return False


@contextmanager
def temporary_postgres_database():
    """A fresh database for one test module, dropped afterwards."""
    import psycopg

    name = f"rigl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def cleanup_redis_queue(queue: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS)
    for key in client.scan_iter(f"*{queue}*"):
        client.delete(key)


def start_worker(env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--loglevel", "INFO",
                             "--name", f"test-{uuid.uuid4().hex[:6]}@%h"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None, what: str = "the API") -> None:
    """Wait until `url`/readyz answers 200; fail at once if `process` (the server) has exited."""
    import httpx

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, what=what)


def stop_group(process: subprocess.Popen, sig: int, timeout: float) -> None:
    """Send `sig` to the process group of a server started with start_new_session; SIGKILL it after
    `timeout` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def serve_process(data_dir: Path, log_path: Path | None = None, args: tuple[str, ...] = (), **env):
    """`rigl serve ARGS` (SQLite and the filesystem broker under `data_dir`) on a free port, with
    none of the caller's RIGL_* settings (nor a metrics folder an in-process test chose) but `env`;
    yields (URL, process) once /readyz answers."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("RIGL_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    environ.update(RIGL_DATA_DIR=str(data_dir), **env)
    port = free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "serve", "--port", str(port), *args],
                               env=environ, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 90, process, what="rigl serve")
        yield url, process
    finally:
        stop_group(process, signal.SIGINT, 30)
        if log_path:
            log.close()


@contextmanager
def embedded_service(data_dir: Path, log_path: Path | None = None, **env):
    """`rigl serve` (API + one worker) as serve_process; yields its URL."""
    with serve_process(data_dir, log_path, **env) as (url, _process):
        yield url

