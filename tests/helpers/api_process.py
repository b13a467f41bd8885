"""The API as its own uvicorn process (not in-process): for tests and benchmarks of what a real server does
under load (event-loop blocking, open streams), where FastAPI's TestClient would hide it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from helpers.service import ROOT, free_port, stop_group, wait_ready


@contextmanager
def api_process(data_dir: Path, database_url: str, broker_url: str, queue: str, log_path: Path | None = None,
                **env):
    """`uvicorn --factory api.app:create_app` on a free loopback port with only these RIGL_* settings
    (auth off unless `RIGL_AUTH` is given); yields its URL once /readyz answers; stops it afterwards."""

    environ = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    environ.update(RIGL_DATA_DIR=str(data_dir), RIGL_DATABASE_URL=database_url, RIGL_BROKER_URL=broker_url,
                   RIGL_QUEUE=queue, RIGL_AUTH="false", **{k: str(v) for k, v in env.items()})
    port = free_port()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
                                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                               env=environ, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, process, what="the API process")
        yield url
    finally:
        stop_group(process, signal.SIGTERM, 15)
        if log_path:
            log.close()
