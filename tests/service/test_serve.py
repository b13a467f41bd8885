"""`rigl serve` as a user runs it: embedded SQLite + filesystem broker + a real worker, one command."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file

from rigl_core.client import Client
from rigl_core.models.registry import build_model
from helpers.service import JOB, ROOT, free_port, wait_for

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
        children = _children(server.pid)  # the worker, and the model checker's fork server
        assert _worker(server.pid) in children
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C stops API and worker
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    # no worker left behind (the fork server ends when it sees its parent's pipe close)
    wait_for(lambda: not any(_alive(pid) for pid in children), 10, what="serve's child processes to end")


# ---------------------------------------------------------------- issue 11, item 11: safe by default
def _serve(tmp_path, *args, env_extra=None, log_name="serve.log"):
    """`rigl serve ARGS` with none of the caller's RIGL_* settings, its own session, a free port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    env.update(env_extra or {})
    log = open(tmp_path / log_name, "ab")
    process = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "serve", "--port", str(port),
                                "--data-dir", str(tmp_path / "data"), *args], env=env, stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    log.close()
    return process, f"http://127.0.0.1:{port}", port


def _wait_up(base: str, process: subprocess.Popen) -> None:
    def up():
        assert process.poll() is None, "rigl serve exited"
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 90, what="rigl serve to start")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _alive(pid: int) -> bool:
    """In /proc and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _status(tmp_path, job_id: str) -> str:
    with sqlite3.connect(tmp_path / "data" / "rigl.db") as db:
        return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_public_host_without_keys_is_refused_with_a_way_out(tmp_path):
    process, _, _ = _serve(tmp_path, "--host", "0.0.0.0", "--no-worker")
    try:
        code = process.wait(timeout=60)
    finally:
        _kill_group(process)
    output = (tmp_path / "serve.log").read_text()
    assert code == 2, output[-2000:]
    assert "refusing to listen on 0.0.0.0 with API keys off" in output
    assert "rigl keys create --owner" in output and "RIGL_AUTH=true" in output and "--insecure-no-auth" in output


def test_host_allow_list_and_cross_site_requests(tmp_path):
    """--insecure-no-auth starts it; DNS-rebinding Hosts get 400, browser cross-site writes 403;
    same-origin dashboard calls, curl-style JSON and the client keep working."""
    process, base, port = _serve(tmp_path, "--host", "0.0.0.0", "--insecure-no-auth", "--no-worker")
    try:
        _wait_up(base, process)
        evil = httpx.get(f"{base}/healthz", headers={"Host": "evil.example"}, timeout=10)
        assert evil.status_code == 400 and evil.json()["error"]["field"] == "Host"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "192.168.7.7"):
            assert httpx.get(f"{base}/healthz", headers={"Host": host}, timeout=10).status_code == 200, host
        assert httpx.get(f"{base}/v1/jobs", headers={"Host": "evil.example:80"}, timeout=10).status_code == 400

        buffer = io.BytesIO()
        np.savez(buffer, x=np.zeros((8, 1, 4, 4), np.float32), y=np.arange(8) % 2)
        npz = buffer.getvalue()
        # a cross-site <form>/fetch(no-cors) upload: text/plain, with the attacker's Origin
        upload = httpx.post(f"{base}/v1/datasets?name=x", content=npz, timeout=10,
                            headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert upload.status_code == 403 and upload.json()["error"]["field"] == "Origin"
        plain = httpx.post(f"{base}/v1/datasets?name=x", content=npz, headers={"Content-Type": "text/plain"}, timeout=10)
        assert plain.status_code == 403 and plain.json()["error"]["field"] == "Content-Type"
        form = httpx.post(f"{base}/v1/datasets?name=x", data={"a": "b"}, timeout=10)  # curl -d's default
        assert form.status_code == 403 and "application/octet-stream" in form.json()["error"]["message"]
        assert httpx.get(f"{base}/v1/datasets", timeout=10).json()["data"] == []

        job = httpx.post(f"{base}/v1/jobs", json=JOB, timeout=30)  # curl -H 'Content-Type: application/json'
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": f"http://127.0.0.1:{port + 1}"}, {"Sec-Fetch-Site": "cross-site"}):
            cancel = httpx.post(f"{base}/v1/jobs/{job_id}/cancel", headers=headers, timeout=10)
            assert cancel.status_code == 403 and cancel.json()["error"]["code"] == "cross_site_request", headers
        assert _status(tmp_path, job_id) == "queued"
        # the dashboard: same origin (fetch sends Origin on POST), JSON or no body
        same = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
        assert httpx.post(f"{base}/v1/plan", json={"model": {"name": "mlp"}, "input_shape": [1, 8, 8],
                                                    "num_classes": 10}, headers=same, timeout=30).status_code == 200
        cancelled = httpx.post(f"{base}/v1/jobs/{job_id}/cancel", headers=same, timeout=10)
        assert cancelled.status_code in (200, 202) and cancelled.json()["status"] in ("cancelling", "cancelled")
        with Client(base) as client:
            dataset = client.upload_dataset(_write(tmp_path / "toy.npz", npz))
            assert dataset["id"].startswith("ds_")
            assert client.submit(JOB).status == "queued"
    finally:
        _kill_group(process)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _worker(pid: int) -> int:
    """The `rigl worker` child of `rigl serve` PID (its other child is the model checker's fork server)."""
    def command(child: int) -> str:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            return ""

    (worker,) = [child for child in _children(pid) if "rigl_core.cli worker" in command(child)]
    return worker


def test_sigterm_stops_serve_and_its_worker_and_leaves_the_queue_alone(tmp_path):
    process, base, _ = _serve(tmp_path)
    family: list[int] = []
    try:
        _wait_up(base, process)
        running = httpx.post(f"{base}/v1/jobs", json={**JOB, "training": {"epochs": 500, "batch_size": 64}},
                             timeout=30).json()["id"]
        queued = httpx.post(f"{base}/v1/jobs", json=JOB, timeout=30).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/jobs/{running}", timeout=10).json()["status"] == "running", 90,
                 what="the worker to start the job")
        worker = _worker(process.pid)
        family += [*_children(process.pid), *_children(worker)]  # the worker, its pool process, the fork server
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        wait_for(lambda: not any(_alive(pid) for pid in family), 10, what="the worker processes to end")
        stopped = time.monotonic() - started
    finally:
        _kill_group(process)
        _kill_all(family)
    print(f"SIGTERM → serve and worker gone in {stopped:.1f}s")
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert stopped < 45
    time.sleep(2)  # nothing is left to consume the queue
    assert _status(tmp_path, queued) == "queued"
    # warm shutdown: it checkpointed and was requeued, and the stopping worker did not take it again
    assert _status(tmp_path, running) in ("queued", "requeued")
    messages = [p for p in (tmp_path / "data" / "broker").iterdir() if p.is_file()]
    assert any(queued in p.read_text(errors="replace") for p in messages)


def test_worker_dies_with_a_killed_serve(tmp_path):
    process, base, _ = _serve(tmp_path)
    family: list[int] = []
    try:
        _wait_up(base, process)
        worker = _worker(process.pid)
        wait_for(lambda: _children(worker), 60, what="the worker's pool process")
        family += [*_children(process.pid), *_children(worker)]
        started = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)  # no handler runs: the kernel tells the worker (PDEATHSIG)
        process.wait()
        wait_for(lambda: not any(_alive(pid) for pid in family), 45, what="the orphaned worker to stop")
        print(f"SIGKILL to serve → worker gone in {time.monotonic() - started:.1f}s")
    finally:
        _kill_group(process)
        _kill_all(family)


def _kill_all(pids: list[int]) -> None:
    """Whatever a failing test left behind (an orphaned worker keeps consuming the queue)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
