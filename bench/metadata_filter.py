"""`GET /v1/jobs` with and without `metadata.KEY=VALUE` filters, in process, on SQLite (issue: labels and search).

Stores `--jobs` jobs of one owner (one in ten has `metadata.team = vision`, the rest other teams), then
times `GET /v1/jobs?limit=20` through FastAPI's TestClient, the variants taking turns request by request:
- unfiltered;
- `metadata.team=vision` (1 job in 10 matches: the page is filled after about 200 rows);
- `metadata.team=vision&metadata.seed=3` (two filters ANDed; fewer matches, so more rows are read);
- `metadata.team=nobody` (no match: every row of the owner is read, the worst case).
Medians in ms over `--requests` requests each.

    python bench/metadata_filter.py [--jobs 1000] [--requests 300]

Writes bench/results/metadata_filter.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = {"unfiltered": "", "metadata.team=vision": "&metadata.team=vision",
           "metadata.team=vision&metadata.seed=3": "&metadata.team=vision&metadata.seed=3",
           "metadata.team=nobody (no match)": "&metadata.team=nobody"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), auth=False)
        with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:
            store = api.app.state.context.store
            spec = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}}
            for i in range(args.jobs):
                team = "vision" if i % 10 == 0 else f"team{i % 10}"
                store.create_job(spec, spec, 10, metadata={"team": team, "seed": i % 7, "git": f"{i:040x}"})
            times: dict[str, list[float]] = {name: [] for name in QUERIES}
            for _ in range(args.requests):
                for name, query in QUERIES.items():
                    start = time.perf_counter()
                    response = api.get("/v1/jobs?limit=20" + query)
                    times[name].append((time.perf_counter() - start) * 1000)
                    assert response.status_code == 200
    lines = ["# GET /v1/jobs with metadata filters", "",
             f"{args.jobs} jobs of one owner on SQLite, in process (TestClient), `limit=20`, median of "
             f"{args.requests} requests each, the variants taking turns; {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}. `python bench/metadata_filter.py --jobs {args.jobs}`.", "",
             "| query | median ms | vs unfiltered |", "|---|---|---|"]
    base = statistics.median(times["unfiltered"])
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| `{name}` | {median:.2f} | {median - base:+.2f} ms |")
    text = "\n".join(lines) + "\n"
    (ROOT / "bench" / "results" / "metadata_filter.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
