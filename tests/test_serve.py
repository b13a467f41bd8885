"""`rigl serve` as a user runs it: embedded SQLite + filesystem broker + a real worker, one command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from safetensors.torch import load_file

from rigl_core.models import build_model
from service_helpers import JOB, ROOT, free_port, wait_for

pytestmark = pytest.mark.slow


def test_rigl_serve_embedded_end_to_end(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "serve", "--port", str(port),
                               "--data-dir", str(tmp_path / "data")], env=env, stdout=log, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, what="rigl serve to start")
        job = httpx.post(f"{base}/v1/jobs", json=JOB, timeout=30).json()
        final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
            httpx.get(f"{base}/v1/jobs/{job['id']}", timeout=10).json()), 120, what="the job")
        assert final["status"] == "succeeded", final
        response = httpx.get(f"{base}/v1/jobs/{job['id']}/checkpoint", params={"format": "dense"}, timeout=30)
        (tmp_path / "m.safetensors").write_bytes(response.content)
        build_model("mlp", 10, [1, 8, 8]).load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
        assert (tmp_path / "data" / "rigl.db").exists()  # embedded SQLite
        assert (tmp_path / "data" / "broker").is_dir()  # kombu's filesystem transport
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        assert children  # the worker process
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C stops API and worker
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    for pid in children:  # no worker left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
