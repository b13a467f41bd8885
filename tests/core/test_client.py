"""The Python client and the client CLI commands against a real `rigl serve` (embedded defaults)."""

from __future__ import annotations

import http.server
import json
import threading

import httpx
import pytest
from safetensors.torch import load_file

from rigl_core.cli import main
from rigl_core.client import Client, InvalidRequest, NotFound, Unavailable
from rigl_core.models.registry import build_model
from helpers.service import JOB, embedded_service, free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    with embedded_service(root / "data") as url:
        yield url, root


def test_submit_wait_report_download_load(server, tmp_path, capsys):
    url, _ = server
    with Client(url) as client:
        job = client.submit(JOB)
        assert job.status == "queued"
        done = job.wait(progress=True, timeout=120)
        assert done.status == "succeeded" and done.result["leak_check_ok"]
        assert "step" in capsys.readouterr().err  # the tqdm bar
        report = job.report()
        assert report["final"] and abs(report["totals"]["sparsity"] - 0.9) < 0.002
        path = job.download(format="dense", path=tmp_path)
        assert path.name.startswith(job.id)
        model = build_model("mlp", 10, [1, 8, 8])
        model.load_state_dict(load_file(str(path)), strict=True)
        packed = job.download(format="packed", path=tmp_path / "p.safetensors")
        assert packed.stat().st_size < path.stat().st_size
        types = [e["type"] for e in job.events()]
        assert types[0] == "status" and "mask_update" in types and types[-1] == "status"
        assert job.id in [j.id for j in client.list(limit=5)]
        assert any(j.id == job.id for j in client.iter_jobs(status="succeeded"))


def test_typed_errors_carry_the_server_message(server):
    url, _ = server
    with Client(url) as client:
        with pytest.raises(InvalidRequest) as info:
            client.submit({**JOB, "sparsity": {"sparsity": 1.0}})
        assert info.value.field == "sparsity.sparsity" and info.value.status == 422
        with pytest.raises(NotFound) as info:
            client.get("job_missing")
        assert info.value.code == "not_found"


def test_cancel_and_cli_commands(server, tmp_path, capsys, monkeypatch):
    url, _ = server
    monkeypatch.setenv("RIGL_API_URL", url)
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({**JOB, "training": {"epochs": 3, "batch_size": 64}}))
    assert main(["submit", str(spec), "--wait", "--set", "training.epochs=1", "--set", "training.seed=5"]) == 0
    job_id = capsys.readouterr().out.split()[0]
    assert main(["status", job_id]) == 0
    assert "succeeded" in capsys.readouterr().out
    with Client(url) as client:  # --set changed the file's values on the way out
        sent = client.get(job_id).data["spec"]["training"]
    assert (sent["epochs"], sent["seed"], sent["batch_size"]) == (1, 5, 64)
    assert main(["jobs", "--limit", "3"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["download", job_id, "--format", "packed", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert (tmp_path / "x.safetensors").exists()
    assert main(["watch", job_id]) == 0
    capsys.readouterr()
    assert main(["status", "job_missing"]) == 2
    assert capsys.readouterr().err.strip() == "rigl: error: job_id: no job 'job_missing'"
    with Client(url) as client:
        long = client.submit({**JOB, "training": {"epochs": 500, "batch_size": 64}})
        wait_for(lambda: client.get(long.id).status == "running", 60, what="running")
        assert long.cancel().status in ("cancelling", "cancelled")
        assert long.wait(timeout=60).status == "cancelled"


class Flaky(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self):  # noqa: N802 - http.server API
        Flaky.calls += 1
        if Flaky.calls <= 2:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"id": "job_x", "status": "queued", "progress": {"step": 0, "total_steps": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retries_on_503_and_gives_up_on_dead_hosts():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{httpd.server_port}", retries=3, backoff=0.01) as client:
            assert client.get("job_x").status == "queued"
        assert Flaky.calls == 3
    finally:
        httpd.shutdown()
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as client:
        with pytest.raises(Unavailable):
            client.get("job_x")


# ---------------------------------------------------------------- issue 11, item 10
class Malicious(http.server.BaseHTTPRequestHandler):
    """A server that suggests a file name outside the caller's folder for every checkpoint."""

    filename = "../../x"

    def do_GET(self):  # noqa: N802 - http.server API
        body = b"not really weights"
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", f'attachment; filename="{Malicious.filename}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("filename", ["../../x", "../../x.safetensors", "..\\\\..\\\\x.safetensors", ".bashrc", ".."])
def test_download_never_writes_where_the_server_says(tmp_path, monkeypatch, filename):
    Malicious.filename = filename
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Malicious)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    try:
        with Client(f"http://127.0.0.1:{httpd.server_port}", retries=0) as client:
            path = client.download("job_evil")
            assert path.resolve().parent == here
            assert path.name == ("x.safetensors" if filename.endswith("x.safetensors") else "job_evil-dense.safetensors")
            assert path.read_bytes() == b"not really weights"
            folder = tmp_path / "out"
            folder.mkdir()
            assert client.download("job_evil", path=folder).resolve().parent == folder
    finally:
        httpd.shutdown()
        httpd.server_close()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith(("a/b/", "out/")) for p in written), written


def test_a_proxy_504_after_forwarding_the_post_still_makes_one_job(server):
    """The proxy forwards the first POST to the real server, drops its answer and says 504; the
    client retries with the same Idempotency-Key and gets that job back."""
    url, _ = server
    seen: list[str | None] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            seen.append(self.headers.get("Idempotency-Key"))
            upstream = httpx.post(f"{url}{self.path}", content=body, headers=headers, timeout=30)
            status, data = (504, b"gateway timeout") if len(seen) == 1 else (upstream.status_code, upstream.content)
            self.send_response(status)
            self.send_header("Content-Type", upstream.headers.get("content-type", "text/plain"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    spec = {**JOB, "training": {"epochs": 1, "batch_size": 64}}
    try:
        with Client(url) as direct:
            before = {j.id for j in direct.iter_jobs()}
            with Client(f"http://127.0.0.1:{httpd.server_port}", backoff=0.01) as client:
                job = client.submit(spec)
            created = {j.id for j in direct.iter_jobs()} - before
            assert created == {job.id}, created
            assert len(seen) == 2 and seen[0] and seen[0] == seen[1]
            with Client(f"http://127.0.0.1:{httpd.server_port}", backoff=0.01) as client:
                other = client.submit(spec)
            assert other.id != job.id  # a new submit is a new job
            for created_job in (job, other):  # not needed any further: leave the worker idle
                direct.cancel(created_job.id)
            for created_job in (job, other):
                direct.wait(created_job.id, timeout=60, poll=0.2)
            # a sweep's POST is retried the same way: one sweep, not two grids
            seen.clear()
            before = {s["id"] for s in direct.sweeps(limit=100)}
            with Client(f"http://127.0.0.1:{httpd.server_port}", backoff=0.01) as client:
                sweep = client.submit_sweep({"base": spec, "grid": {"seed": [0, 1]}})
            assert {s["id"] for s in direct.sweeps(limit=100)} - before == {sweep["id"]}
            assert len(seen) == 2 and seen[0] and seen[0] == seen[1]
            direct.delete_sweep(sweep["id"])
    finally:
        httpd.shutdown()
        httpd.server_close()
