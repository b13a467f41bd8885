"""Run the reliability and fuzz suites and write their figures to bench/results/reliability.md.

    python bench/reliability_report.py
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


def main() -> None:
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                             "tests/test_reliability.py", "tests/test_fuzz.py"], cwd=ROOT, capture_output=True,
                            text=True)
    lines = re.findall(r"^(?:reliability|fuzz): .*$", result.stdout, flags=re.M)
    summary = re.findall(r"(\d+ passed[^=]*?) in [\d.]+s", result.stdout)
    text = "\n".join([
        "# Reliability report",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}; real PostgreSQL 15, "
        "Redis 7 (a private redis-server with appendonly for the restart test) and Celery worker processes; "
        f"suite wall time {(time.time() - started) / 60:.1f} min; pytest: {summary[-1] if summary else result.returncode}.",
        "",
        "| scenario | figures |",
        "|---|---|",
        *[f"| {line.split(': ', 2)[1] if line.startswith('reliability') else 'fuzz'} | "
          f"{line.split(': ', 2)[-1]} |" for line in lines],
        "",
        "Kill test: 10 identical jobs on 2 workers; a busy worker (main process and child) SIGKILLed 3 times and "
        "restarted; duplicates = runs not preceded by a requeue; every final checkpoint is bitwise identical to the "
        "others (resumed or not). Fuzz: schemathesis over every operation of the OpenAPI schema, plus path-traversal "
        "attempts on every download route (all 404).",
    ]) + "\n"
    out = ROOT / "bench" / "results" / "reliability.md"
    out.write_text(text)
    print(text)
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
