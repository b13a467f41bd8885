"""The client commands (`rigl --help`, status, jobs, download) must start without torch: it costs
~2 s and ~650 MB per call (issue 14). Checked by what gets imported, not by timing, in a fresh
interpreter each time (this test process has torch loaded already)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "torchvision", "numpy", "transformers", "timm", "safetensors")

# A stub service in the child's own thread answers the three GETs, so the commands run to the end.
STUB = textwrap.dedent('''
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    JOB = {"id": "job_00ff", "status": "succeeded", "progress": {"step": 3, "total_steps": 3}, "spec": {}}

    class Stub(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            body = (b"\\0" * 8 if path.endswith("/checkpoint") else
                    json.dumps({"data": [JOB], "has_more": False} if path == "/v1/jobs" else JOB).encode())
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import os
    os.environ["RIGL_API_URL"] = f"http://127.0.0.1:{server.server_address[1]}"
''')


def _run(code: str, tmp_path, torch_free: bool = True) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; with `torch_free`, then assert none of HEAVY got imported."""
    check = f"\nheavy = [m for m in {HEAVY!r} if m in sys.modules]\nassert not heavy, heavy\n" if torch_free else ""
    return subprocess.run([sys.executable, "-c", "import sys\n" + code + check + "print('ok')\n"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)


def test_help_and_client_argument_parsing_do_not_import_torch(tmp_path):
    proc = _run(textwrap.dedent('''
        import sys
        from rigl_core.cli import build_parser, main
        parser = build_parser()
        for argv in (["jobs"], ["status", "job_1"], ["download", "job_1", "--format", "packed"]):
            parser.parse_args(argv)
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
    '''), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: rigl" in proc.stdout and proc.stdout.rstrip().endswith("ok")


def test_client_commands_run_against_a_service_without_torch(tmp_path):
    proc = _run(STUB + textwrap.dedent('''
        from rigl_core.cli import main
        assert main(["jobs"]) == 0
        assert main(["status", "job_00ff"]) == 0
        assert main(["download", "job_00ff", "--out", "m.safetensors"]) == 0
    '''), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("job_00ff  succeeded") == 2  # jobs and status each print the job line
    assert (tmp_path / "m.safetensors").read_bytes() == b"\0" * 8


@pytest.mark.slow
def test_specs_import_without_torch_and_build_with_it(tmp_path):
    """JobSpec and Architecture are plain pydantic models; torch comes in only when a model is built."""
    proc = _run(textwrap.dedent('''
        import sys
        from rigl_core.spec import JobSpec
        from rigl_core.models.architecture import Architecture
        arch = Architecture.model_validate({"input_shape": [4], "layers": [{"type": "linear", "out_features": 2}]})
        assert "torch" not in sys.modules
        from rigl_core.models.build import infer
        _, out_shape, params = infer(arch)
        assert (out_shape, params) == ((2,), 10), (out_shape, params)
        assert "torch" in sys.modules
    '''), tmp_path, torch_free=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_missing_service_is_said_at_once_with_what_to_do(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    proc = _run(textwrap.dedent(f'''
        import os
        os.environ["RIGL_API_URL"] = "http://127.0.0.1:{port}"
        from rigl_core.cli import main
        assert main(["status", "job_00ff"]) == 1
    '''), tmp_path)  # its retries (1.5 s of backoff, not 15 s): tests/core/test_client_messages.py
    assert proc.returncode == 0, proc.stderr
    assert "cannot reach" in proc.stderr and "rigl serve" in proc.stderr
