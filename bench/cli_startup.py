"""CLI start-up: median wall time of `rigl --help` and the client commands (status, jobs, download)
against a stub service, plus the heaviest imports of `rigl --help` from `python -X importtime`.

Why: the client commands must not pay for torch (issue 14); this records what they cost.
Usage: python bench/cli_startup.py [--runs 7] [--label after] [--out bench/results/cli_startup.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

JOB = {"id": "job_0123abcd", "status": "succeeded", "progress": {"step": 46, "total_steps": 46},
       "spec": {"sparsity": {"method": "rigl", "sparsity": 0.9}}, "result": {"final_metrics": {"val_accuracy": 0.95}}}


class _Stub(BaseHTTPRequestHandler):
    """Answers the three GETs the client commands make; nothing else."""

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/v1/jobs":
            self._send(json.dumps({"data": [JOB], "has_more": False}).encode(), "application/json")
        elif path.endswith("/checkpoint"):
            self._send(b"\0" * 64, "application/octet-stream",
                       {"Content-Disposition": 'attachment; filename="model.safetensors"'})
        elif path.startswith("/v1/jobs/"):
            self._send(json.dumps(JOB).encode(), "application/json")
        else:
            self.send_error(404)

    def _send(self, body: bytes, kind: str, headers: dict | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _rigl() -> list[str]:
    exe = shutil.which("rigl")
    return [exe] if exe else [sys.executable, "-m", "rigl_core.cli"]


def _time(cmd: list[str], env: dict, cwd: str, runs: int) -> tuple[float, float, int]:
    """Median wall seconds, peak RSS in MB (os.wait4's rusage of that one child) and the exit status."""
    times, peaks = [], []
    rc = 0
    for _ in range(runs):
        start = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        times.append(time.perf_counter() - start)
        child.returncode = rc = os.waitstatus_to_exitcode(status)
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(times), max(peaks), rc


def _top_imports(n: int = 12) -> tuple[list[tuple[int, str]], int, bool]:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import sys; from rigl_core.cli import build_parser; build_parser();"
                          "print('torch' in sys.modules, file=sys.stderr)"],
                         capture_output=True, text=True).stderr.splitlines()
    rows, total = [], 0
    for line in err:
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|", 2)
            name, us = name[1:], int(cumulative.strip())
            if not name.startswith(" "):
                total += us  # top level: children's time is inside it
            if not name.startswith("      "):  # three levels deep at most, to show the chain
                rows.append((us, name.strip()))
    rows.sort(reverse=True)
    return rows[:n], total, err[-1].strip() == "True"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--label", default="now")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "RIGL_API_URL": f"http://127.0.0.1:{server.server_address[1]}"}
    rigl = _rigl()
    commands = {"rigl --help": ["--help"], "rigl status JOB": ["status", JOB["id"]], "rigl jobs": ["jobs"],
                "rigl download JOB": ["download", JOB["id"], "--out", "x.safetensors"]}
    lines = [f"## {args.label}", "", f"median of {args.runs} runs, `{' '.join(rigl)}`, stub service on localhost", "",
             "| command | median wall s | peak RSS MB | exit |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as cwd:
        for label, argv in commands.items():
            median, peak, rc = _time(rigl + argv, env, cwd, args.runs)
            lines.append(f"| `{label}` | {median:.3f} | {peak:.0f} | {rc} |")
    server.shutdown()
    top, total, torch_loaded = _top_imports()
    lines += ["", f"`import rigl_core.cli` + `build_parser()`: {total / 1e6:.3f} s of imports (importtime, "
              f"top level), torch imported: {torch_loaded}", "", "| import (top three levels) | cumulative s |", "|---|---|"]
    lines += [f"| {name} | {us / 1e6:.3f} |" for us, name in top]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
