"""Time to upgrade a first-release database holding 10,000 jobs and 1,000,000 events to the current schema.

Why: every start upgrades a database that is behind (issue 15 item 2); this says how long an operator's
first start of a new release takes on a large embedded (SQLite) or PostgreSQL database, and what the
start-up check costs once the schema is at head.

The database is made by the first release's own models (tests/helpers/first_release_models.py, its create_all),
its jobs with a realistic resolved spec; events are generated in SQL. Then, timed: store.migrations.upgrade
(stamp 0001, 0002's missing columns and tables, 0003's columns, method backfill from each job's spec,
indexes, job_tags), then the check every later start makes (make_engine on a database at head).

Usage: python bench/db_upgrade.py [--jobs 10000] [--events 1000000] [--postgres] [--out bench/results/db_upgrade.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy import create_engine, text  # noqa: E402

from helpers import first_release_models as first  # noqa: E402
from helpers.service import JOB, postgres_available, temporary_postgres_database  # noqa: E402


def build(url: str, jobs: int, events: int) -> None:
    """A first-release database: its create_all, `jobs` rows, `events` spread evenly over them."""
    from rigl_core.spec import JobSpec

    engine = create_engine(url)
    first.Base.metadata.create_all(engine)
    methods = ("rigl", "set", "snfs", "static")
    specs = {m: {**JOB, "sparsity": {**JOB["sparsity"], "method": m}} for m in methods}
    resolved = {m: JobSpec.model_validate(s).model_dump(mode="json") for m, s in specs.items()}
    start = dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc)
    rows = [{"id": f"job_{i:020x}", "owner": f"user{i % 50}", "status": "succeeded", "spec": specs[methods[i % 4]],
             "resolved_spec": resolved[methods[i % 4]], "created_at": start + dt.timedelta(seconds=i), "step": 46,
             "total_steps": 46, "attempt": 1, "cancel_requested": False, "result": {"sparsity": 0.9}}
            for i in range(jobs)]
    per_job = events // jobs
    with engine.begin() as connection:
        for offset in range(0, jobs, 2000):
            connection.execute(first.Job.__table__.insert(), rows[offset:offset + 2000])
        series = ("WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < :per) SELECT k FROM n"
                  if engine.dialect.name == "sqlite" else "SELECT generate_series(1, :per) AS k")
        data = ("json_object('step', k, 'loss', 1.0 / k)" if engine.dialect.name == "sqlite"
                else "json_build_object('step', k, 'loss', 1.0 / k)")
        connection.execute(text(
            f"INSERT INTO events (job_id, created_at, type, level, message, data) "
            f"SELECT jobs.id, jobs.created_at, 'metrics', 'info', 'step ' || k, {data} "
            f"FROM jobs CROSS JOIN ({series}) AS steps ORDER BY jobs.seq, k"), {"per": per_job})
    with engine.connect() as connection:
        counts = [connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("jobs", "events")]
    engine.dispose()
    assert counts == [jobs, per_job * jobs], counts


def measure(url: str, jobs: int, events: int, checks: int = 5) -> dict:
    from store.engine import make_engine
    from store.migrations import HEAD, schema_diff, upgrade

    started = time.perf_counter()
    build(url, jobs, events)
    built = time.perf_counter() - started
    engine = create_engine(url)
    started = time.perf_counter()
    before, after = upgrade(engine)
    upgraded = time.perf_counter() - started
    assert (before, after) == (None, HEAD) and schema_diff(engine) == []
    with engine.connect() as connection:
        methods = connection.execute(text("SELECT count(*) FROM jobs WHERE method IS NOT NULL")).scalar_one()
    assert methods == jobs
    engine.dispose()
    times = []
    for _ in range(checks):  # what each later start pays: make_engine's schema check at head
        started = time.perf_counter()
        make_engine(url).dispose()
        times.append(time.perf_counter() - started)
    return {"build_s": built, "upgrade_s": upgraded, "check_ms": 1000 * statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL (RIGL_TEST_PG)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh databases per row (median, range)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "db_upgrade.md"))
    args = parser.parse_args()
    import alembic  # noqa: F401 - imported before timing: every start imports it anyway
    import store.migrations  # noqa: F401

    runs: dict[str, list[dict]] = {"SQLite": [], "SQLite, 1 event a job": [], "PostgreSQL": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            for name, events in (("SQLite", args.events), ("SQLite, 1 event a job", args.jobs)):
                path = Path(folder) / f"{events}.db"  # 1 event a job: what the million events cost
                runs[name].append({**measure(f"sqlite:///{path}", args.jobs, events),
                                   "size_mb": os.path.getsize(path) / 1e6})
        if args.postgres and postgres_available():
            with temporary_postgres_database() as url:
                run = measure(url, args.jobs, args.events)
                engine = create_engine(url)
                with engine.connect() as connection:
                    run["version"] = connection.execute(text("SHOW server_version")).scalar_one().split()[0]
                    run["size_mb"] = connection.execute(
                        text("SELECT pg_database_size(current_database())")).scalar_one() / 1e6
                engine.dispose()
                runs["PostgreSQL"].append(run)
    lines = [
        "# Upgrading a first-release database to the current schema",
        "",
        f"`python bench/db_upgrade.py --jobs {args.jobs} --events {args.events}"
        f"{' --postgres' if args.postgres else ''} --repeats {args.repeats}` on a {os.cpu_count()}-core Linux VM without a GPU "
        f"(Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, shared with other work).",
        "",
        f"The database: the first release's own create_all (commit 74f9590), {args.jobs:,} jobs (resolved spec "
        f"1.5 KB of JSON each) and {args.events:,} events. Timed: `store.migrations.upgrade` (stamp 0001, then "
        "0002 to head: the missing columns and tables, each job's method filled from its spec, the new indexes, 64-bit sizes, "
        "job_tags), in one transaction under the upgrade lock; then what each later start pays for the schema "
        "check (`make_engine` on a database at head, median of 5).",
        "",
        f"Each row: {args.repeats} fresh databases, median (min–max).",
        "",
        "| database | size | making it (not part of the upgrade) | upgrade to head | start-up check at head |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rs in runs.items():
        if not rs:
            continue
        label = f"{name} {rs[0]['version']}" if "version" in rs[0] else name

        def cell(key, fmt, scale=1.0):
            values = [r[key] * scale for r in rs]
            return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

        lines.append(f"| {label} | {rs[0]['size_mb']:.0f} MB | {statistics.median(r['build_s'] for r in rs):.1f} s "
                     f"| {cell('upgrade_s', '.2f')} s | {cell('check_ms', '.1f')} ms |")
    lines += ["", "No revision reads or rewrites `events` (adding a column is a catalogue change on both "
              "databases); the work follows the jobs count: the method backfill and the new indexes. The second "
              "SQLite row, the same jobs with one event each, shows what the million events add."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
