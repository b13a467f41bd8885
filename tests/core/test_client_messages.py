"""What the Python client and the client commands say when something is wrong (issue 26 items 6 and 7): no
service at the URL, a key the service wants, a broken job file, Ctrl-C in `rigl watch`, and the watch bar's
step rate after attaching to a running job. The services here are small real HTTP servers on localhost."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import threading

import pytest

from rigl_core.cli import main
from rigl_core.client import Client, ServiceUnreachable
from helpers.service import free_port


def job_json(step: int, status: str = "running", total: int = 10_000) -> dict:
    return {"id": "job_00ff", "status": status, "progress": {"step": step, "total_steps": total},
            "spec": {"sparsity": {"method": "rigl", "sparsity": 0.9}}, "metrics": {"loss": 0.5}}


@contextlib.contextmanager
def fake_service(answer):
    """A real HTTP server on localhost; answer(method, path) -> (status, JSON body). Yields its URL."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            status, body = answer(self.command, self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply  # noqa: N815 - http.server API

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def sleeps(monkeypatch):
    """The client's backoff sleeps, recorded instead of slept: how long it would wait, not how long it took."""
    recorded: list[float] = []
    monkeypatch.setattr("rigl_core.client.time.sleep", recorded.append)
    return recorded


def test_a_service_that_never_answered_is_given_up_on_after_two_quick_retries(sleeps):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url) as client, pytest.raises(ServiceUnreachable) as info:
        client.get("job_00ff")
    assert sleeps == [0.5, 1.0]  # 1.5 s, not the 15.5 s of five retries meant for a restarting server
    message = str(info.value)
    assert "\n" not in message and url in message and "`rigl serve`" in message and "RIGL_API_URL" in message
    assert info.value.url == url


def test_a_service_that_answered_before_gets_the_restart_retries(sleeps):
    calls = []

    def answer(method, path):
        calls.append(path)
        return 200, job_json(1)

    with contextlib.ExitStack() as server:
        client = Client(server.enter_context(fake_service(answer)))
        assert client.get("job_00ff").status == "running"
    with client, pytest.raises(ServiceUnreachable):  # the server is gone now: it may be restarting
        client.get("job_00ff")
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0] and len(calls) == 1


def test_the_cli_says_at_once_where_it_looked_and_how_to_start_the_service(sleeps, monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RIGL_API_URL", url)
    assert main(["status", "job_00ff"]) == 1
    err = capsys.readouterr().err
    assert sum(sleeps) <= 1.5
    assert err.startswith(f"rigl: error: cannot reach the RigL service at {url}") and "`rigl serve`" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key, says", [(None, "set RIGL_API_KEY"), ("rigl_key_wrong", "RIGL_API_KEY was refused")])
def test_a_401_tells_the_cli_user_about_rigl_api_key(monkeypatch, capsys, key, says):
    refused = {"error": {"code": "unauthorized", "message": "missing or invalid API key"}}
    with fake_service(lambda method, path: (401, refused)) as url:
        monkeypatch.setenv("RIGL_API_URL", url)
        if key:
            monkeypatch.setenv("RIGL_API_KEY", key)
        else:
            monkeypatch.delenv("RIGL_API_KEY", raising=False)
        assert main(["jobs"]) == 2
    err = capsys.readouterr().err
    assert "missing or invalid API key" in err and says in err and "rigl keys create" in err


@pytest.mark.parametrize("name, text, says", [
    ("broken.json", '{"model": {"name": "mlp"}\n  "dataset": {}}', "is not valid JSON: Expecting ',' delimiter at line 2, column 3"),
    ("broken.yaml", "model:\n  name: mlp\n dataset: [", "is not valid YAML:"),
])
def test_a_broken_job_file_is_named_with_where_it_breaks(tmp_path, capsys, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rigl: error: {path} {says}"), err
    assert "--config" not in err and re.search(r"line \d+, column \d+", err), err


def test_rigl_watch_counts_its_rate_from_the_steps_seen_since_attaching(monkeypatch, capsys):
    """Attached at step 5,000 of a job that then makes 10 steps per (fake) second: the bar shows about 10
    step/s, not 5,000 steps over the first second."""
    import tqdm.std

    polls = iter([job_json(5000), job_json(5010), job_json(5020), job_json(5030, "succeeded")])
    clock = [0.0]

    def answer(method, path):
        clock[0] += 1.0  # every poll is one second later on tqdm's clock
        return 200, next(polls)

    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    with fake_service(answer) as url:
        monkeypatch.setenv("RIGL_API_URL", url)
        assert main(["watch", "job_00ff"]) == 0
    err = capsys.readouterr().err
    rates = [float(r) for r in re.findall(r"([\d.]+)step/s", err)]
    assert rates and max(rates) <= 12, err  # old bar: 5,010 steps / 1 s
    assert "5030/10000" in err


def test_ctrl_c_in_rigl_watch_says_the_job_keeps_running(monkeypatch, capsys):
    # Python's own Ctrl-C handler, whatever this process inherited: a process started in the background by a
    # non-interactive shell ignores SIGINT, and the watch would then poll forever.
    polls = []

    def answer(method, path):
        polls.append(path)
        if len(polls) == 2:  # the user presses Ctrl-C while the second poll is on its way
            os.kill(os.getpid(), signal.SIGINT)
        return 200, job_json(10 * len(polls))

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with fake_service(answer) as url:
            monkeypatch.setenv("RIGL_API_URL", url)
            assert main(["watch", "job_00ff"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "the job keeps running; `rigl cancel job_00ff` stops it" in err


def test_rigl_cancel_cancels_the_job(monkeypatch, capsys):
    requests = []

    def answer(method, path):
        requests.append((method, path))
        return 202, job_json(40, "cancelling")

    with fake_service(answer) as url:
        monkeypatch.setenv("RIGL_API_URL", url)
        assert main(["cancel", "job_00ff"]) == 0
    assert requests == [("POST", "/v1/jobs/job_00ff/cancel")]
    assert "job_00ff  cancelling" in capsys.readouterr().out
