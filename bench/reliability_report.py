"""Run the reliability, security and fuzz suites and write their figures to bench/results/reliability.md.

    python bench/reliability_report.py

Each figure is printed by the test that asserts it (lines starting `reliability:` or `fuzz:`), so the
report can only show what a passing (or visibly failing) test measured.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = [f"tests/service/test_{name}.py" for name in (
    "reliability", "worker_lease_service", "job_caps", "upload_bombs", "user_paths", "api_responsiveness", "fuzz")]


def main() -> None:
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "", "-s", "-q", "-p", "no:cacheprovider", *SUITES],
                            cwd=ROOT, capture_output=True, text=True)
    lines = re.findall(r"^(?:reliability|fuzz): .*$", result.stdout, flags=re.M)
    probes = re.findall(r"^PROBE (.*) -> (\d+) ([\w.]+): (.*)$", result.stdout, flags=re.M)
    summary = re.findall(r"(\d+ (?:passed|failed)[^=]*?) in [\d.]+s", result.stdout)
    rows = [f"| {line.split(': ', 2)[1]} | {line.split(': ', 2)[2]} |" if line.startswith("reliability")
            else f"| fuzz | {line.removeprefix('fuzz: ')} |" for line in lines]
    if probes:
        statuses = sorted({status for _, status, _, _ in probes})
        messages = {message for _, _, _, message in probes}
        rows.append(f"| path probes | {len(probes)} probes ({', '.join(p for p, _, _, _ in probes)}): status "
                    f"{'/'.join(statuses)}, field dataset.path, {len(messages)} distinct message, no server path |")
    streams = ROOT / "bench" / "results" / "api_under_load.md"
    text = "\n".join([
        "# Reliability report",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}; real PostgreSQL 15, "
        "Redis 7 (a private redis-server with appendonly for the restart test) and Celery worker processes; "
        f"suites: {', '.join(s.removeprefix('tests/service/') for s in SUITES)}; wall time "
        f"{(time.time() - started) / 60:.1f} min; pytest: {summary[-1] if summary else result.returncode}.",
        "",
        "| scenario | figures |",
        "|---|---|",
        *rows,
        "",
        "Kill test: 10 identical jobs on 2 workers; a busy worker (main process and child) SIGKILLed 3 times and "
        "restarted; duplicates = runs not preceded by a requeue; every final checkpoint is bitwise identical to the "
        "others (resumed or not). Database down: a TCP proxy between the worker and PostgreSQL is closed for 20 s "
        "(the shared server keeps running). Clock skew: a sitecustomize shim shifts `time.time` and "
        "`datetime.now` in the worker processes. Fuzz: schemathesis over every operation of the OpenAPI schema, "
        "DELETE routes included, plus path-traversal attempts on every download route (all 404).",
        "",
        f"300 open event streams and `/healthz` under a table lock: see `{streams.relative_to(ROOT)}` "
        "(`python bench/api_under_load.py`).",
    ]) + "\n"
    out = ROOT / "bench" / "results" / "reliability.md"
    out.write_text(text)
    print(text)
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
