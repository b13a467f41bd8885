"""A real `mlflow server` for the tests: SQLite backend and a local artifact root in the test's folder, on a
free 127.0.0.1 port, one worker. Ready when /health answers; the wait follows the server's progress (its
log growing) instead of a fixed sleep, and fails at once if the server exits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from helpers.service import free_port

STALL_SECONDS = 90.0  # no new log line and no health answer for this long: the server is stuck


def mlflow_command() -> list[str]:
    found = shutil.which("mlflow", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    return [found] if found else [sys.executable, "-m", "mlflow"]


@contextmanager
def mlflow_server(folder: Path):
    """Yields the server's http://127.0.0.1:PORT; stops it (its whole process group) afterwards."""
    import httpx

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "mlflow-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*mlflow_command(), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        size, last_progress = 0, time.monotonic()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            grown = log_path.stat().st_size
            if grown != size:
                size, last_progress = grown, time.monotonic()
            elif time.monotonic() - last_progress > STALL_SECONDS:
                raise TimeoutError(f"mlflow server made no progress for {STALL_SECONDS:.0f} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)  # its gunicorn/uvicorn children may outlive a TERM
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
