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
# Round 3: the surface added since (weights, quotas, text inputs, deletion, model bounds, sweeps) and the
# operator's side (metrics port, logs, schema checks, disk full). Run separately so its table stands alone.
ROUND3 = [f"tests/service/test_{name}.py" for name in (
    "weights_header", "storage_quotas", "text_inputs", "fuzz_seeded", "deletion", "secret_settings", "model_bounds",
    "sweeps", "worker_logs", "worker_lease", "metrics", "schema_on_start", "spec_versions", "webhooks")]
FIGURE = re.compile(r"^(?:reliability|fuzz(?: \(\w+\))?): .*$", flags=re.M)


def run(suites: list[str]) -> tuple[list[str], list[tuple[str, ...]], str]:
    """Run `suites` (slow tests included); the figure rows, the path probes and pytest's summary line."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "", "-s", "-q", "-p", "no:cacheprovider", *suites],
                            cwd=ROOT, capture_output=True, text=True)
    rows = []
    for line in FIGURE.findall(result.stdout):
        kind, rest = line.split(": ", 1)
        scenario, _, figures = rest.partition(": ") if kind == "reliability" else (kind, "", rest)
        if not figures:  # a line with no scenario name of its own
            scenario, figures = kind, rest
        rows.append(f"| {scenario} | {figures} |")
    probes = re.findall(r"^PROBE (.*) -> (\d+) ([\w.]+): (.*)$", result.stdout, flags=re.M)
    summary = re.findall(r"(\d+ (?:passed|failed)[^=]*?) in [\d.]+s", result.stdout)
    return rows, probes, summary[-1] if summary else f"exit {result.returncode}"


def main() -> None:
    started = time.time()
    rows, probes, summary = run(SUITES)
    if probes:
        statuses = sorted({status for _, status, _, _ in probes})
        messages = {message for _, _, _, message in probes}
        rows.append(f"| path probes | {len(probes)} probes ({', '.join(p for p, _, _, _ in probes)}): status "
                    f"{'/'.join(statuses)}, field dataset.path, {len(messages)} distinct message, no server path |")
    minutes = (time.time() - started) / 60
    started = time.time()
    round3, _, summary3 = run(ROUND3)
    minutes3 = (time.time() - started) / 60
    streams = ROOT / "bench" / "results" / "api_under_load.md"
    text = "\n".join([
        "# Reliability report",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}; real PostgreSQL 15, "
        "Redis 7 (a private redis-server with appendonly for the restart test) and Celery worker processes; "
        f"suites: {', '.join(s.removeprefix('tests/service/') for s in SUITES)}; wall time "
        f"{minutes:.1f} min; pytest: {summary}.",
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
        "",
        "## Round 3",
        "",
        f"The surface added since round 2 and the operator's side; suites: "
        f"{', '.join(s.removeprefix('tests/service/') for s in ROUND3)}; wall time {minutes3:.1f} min; "
        f"pytest: {summary3}.",
        "",
        "| scenario | figures |",
        "|---|---|",
        *round3,
        "",
        "Seeded fuzz: every route family, with NULs, lone surrogates, huge numbers and wrong types mixed into "
        "otherwise valid requests (tests/helpers/fuzz.py); a 5xx fails the test. Also asserted in these suites, "
        "without a figure of their own: placeholder and unreadable secret files stop the service; the worker's "
        "metrics port listens on 127.0.0.1 and wants the token, owner labels are HMAC-SHA256 with a server key; "
        "a worker refuses a schema behind the code with auto-upgrade off, and hands a job whose spec is newer "
        "than it reads back without spending an attempt; webhooks refuse loopback, private, link-local "
        "(169.254.169.254), multicast, CGNAT and IPv4-mapped addresses at creation and again at send time, "
        "and follow no redirect.",
    ]) + "\n"
    out = ROOT / "bench" / "results" / "reliability.md"
    out.write_text(text)
    print(text)
    sys.exit(0 if "failed" not in summary + summary3 else 1)


if __name__ == "__main__":
    main()
