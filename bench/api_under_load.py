"""API under load: GET latency with hundreds of open event streams, and /healthz with a locked table.

Starts the API as its own uvicorn process on a fresh PostgreSQL database (Redis as the broker; nothing
consumes the queue), makes one job `running` and has a simulated worker write two events a second to
it, then measures:

1. `GET /v1/jobs/{id}` latency (sequential requests on one keep-alive connection) with no stream open,
   then with `--streams` (default 300) SSE streams of that job open in a separate process;
2. `/healthz` latency while another session holds `LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE` for
   `--lock-seconds` and 45 `GET /v1/jobs/{id}` requests wait on it;
3. the database transactions the API ran while the streams were open (pg_stat_database).

    python bench/api_under_load.py [--streams 300] [--requests 500] [--label this-tree]

Results go to bench/results/api_under_load.{json,md}; `--baseline FILE.json` (an earlier run's JSON,
e.g. of the code before issue 11) adds its figures as a comparison column. Needs PostgreSQL and Redis
on 127.0.0.1 (tests/helpers/service.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.api_process import api_process  # noqa: E402
from helpers.service import (JOB, PG_ADMIN, REDIS, cleanup_redis_queue,  # noqa: E402
                             temporary_postgres_database)


def percentiles(samples: list[float]) -> dict:
    p99 = statistics.quantiles(samples, n=100)[98] if len(samples) >= 2 else max(samples)
    return {"n": len(samples), "p50_ms": round(statistics.median(samples) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2), "max_ms": round(max(samples) * 1000, 2)}


def time_gets(url: str, path: str, count: int, timeout: float = 60, client: httpx.Client | None = None
              ) -> tuple[list[float], int]:
    """`count` sequential GETs on one connection; without `client`, a new one warmed by an untimed GET."""
    latencies, errors = [], 0
    if client is None:
        with httpx.Client(base_url=url, timeout=timeout) as client:
            client.get(path)  # warm the connection
            return time_gets(url, path, count, timeout, client)
    for _ in range(count):
        start = time.perf_counter()
        try:
            ok = client.get(path).status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append(time.perf_counter() - start)
        errors += not ok
    return latencies, errors


def transactions(database_url: str) -> int:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                            (database_url.rsplit("/", 1)[1],)).fetchone()[0]


def streams_child(url: str, job_id: str, count: int) -> None:
    """Runs in its own process: open `count` streams, print 'ready N' once all answered, read until killed."""
    received = [0]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=None),
                                     limits=httpx.Limits(max_connections=count + 10)) as client:
            opened = asyncio.Event()
            status: list[int] = []

            async def one():
                async with client.stream("GET", f"/v1/jobs/{job_id}/events/stream") as response:
                    status.append(response.status_code)
                    if len(status) == count:
                        opened.set()
                    async for line in response.aiter_lines():
                        if line.startswith("id: "):
                            received[0] += 1

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await opened.wait()
            print(f"ready {sum(s == 200 for s in status)}", flush=True)
            while True:
                await asyncio.sleep(1)
                print(f"received {received[0]}", flush=True)
                if all(t.done() for t in tasks):
                    return

    asyncio.run(main())


def simulated_worker(store, job_id: str, token: str, stop: threading.Event, period: float = 0.5) -> None:
    step = 0
    while not stop.wait(period):
        step += 1
        store.events.add_events(job_id, [{"type": "metrics", "message": f"step {step}", "data": {"step": step, "loss": 1.0}}])
        store.leases.heartbeat(job_id, token, step)


def measure(args) -> dict:
    from store.jobs import JobStore

    queue = f"rigl-bench-{uuid.uuid4().hex[:8]}"
    results: dict = {"label": args.label, "streams": args.streams, "requests": args.requests,
                     "machine": f"{os.cpu_count()} cores ({platform.machine()})",
                     "date": dt.date.today().isoformat()}
    with tempfile.TemporaryDirectory() as tmp, temporary_postgres_database() as database_url:
        try:
            with api_process(Path(tmp), database_url, REDIS, queue, Path(tmp) / "api.log",
                             RIGL_MAX_STREAMS_PER_OWNER=str(args.streams + 10),
                             RIGL_REAPER_INTERVAL_SECONDS="3600") as url:
                store = JobStore(database_url)
                job_id = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()["id"]
                job, token = store.claims.claim(job_id, max_attempts=3, worker="bench:1")
                job_id = job.id
                stop = threading.Event()
                writer = threading.Thread(target=simulated_worker, args=(store, job_id, token, stop), daemon=True)
                writer.start()
                path = f"/v1/jobs/{job_id}"

                latencies, errors = time_gets(url, path, args.requests)
                results["get_no_streams"] = {**percentiles(latencies), "errors": errors}

                child = subprocess.Popen([sys.executable, __file__, "--streams-child", url, job_id, str(args.streams)],
                                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
                try:
                    line = child.stdout.readline().strip()
                    results["streams_open"] = int(line.split()[1]) if line.startswith("ready") else line
                    time.sleep(2)
                    latencies, errors = time_gets(url, path, args.requests)
                    results["get_with_streams"] = {**percentiles(latencies), "errors": errors}
                    time.sleep(11)  # PostgreSQL flushes an idle backend's statistics within 10 s
                    before, start = transactions(database_url), time.monotonic()
                    time.sleep(10)
                    results["db_transactions_per_second_with_streams"] = round(
                        (transactions(database_url) - before) / (time.monotonic() - start), 1)
                finally:
                    child.send_signal(signal.SIGTERM)
                    output = child.communicate(timeout=30)[0]
                counts = [int(line.split()[1]) for line in output.splitlines() if line.startswith("received ")]
                if len(counts) >= 2:  # printed once a second by the stream client
                    results["events_delivered_per_second"] = round((counts[-1] - counts[0]) / (len(counts) - 1), 1)

                results["healthz_with_table_lock"] = healthz_under_lock(url, database_url, path, args.lock_seconds)
                stop.set()
                writer.join(timeout=10)
                store.engine.dispose()
        finally:
            cleanup_redis_queue(queue)
    return results


def healthz_under_lock(url: str, database_url: str, job_path: str, lock_seconds: float) -> dict:
    import psycopg

    waiting = []
    client = httpx.Client(base_url=url, timeout=120)
    client.get("/healthz")  # connect before the lock: every timed request runs while it is held (or waits)
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as locker:
        locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        readers = [threading.Thread(target=lambda: waiting.append(httpx.get(f"{url}{job_path}", timeout=120)
                                                                  .status_code), daemon=True) for _ in range(45)]
        for reader in readers:
            reader.start()
        time.sleep(0.5)
        release = threading.Timer(lock_seconds, locker.rollback)  # old code: healthz waits for this
        release.start()
        latencies, errors = [], 0
        while not release.finished.is_set():  # as many as fit while the lock is held
            more, failed = time_gets(url, "/healthz", 1, client=client)
            latencies += more
            errors += failed
        release.join()
    client.close()
    for reader in readers:
        reader.join(timeout=120)
    return {**percentiles(latencies), "errors": errors, "lock_seconds": lock_seconds,
            "blocked_gets_answered": waiting.count(200)}


def write(results: dict, baseline: dict | None, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "api_under_load.json").write_text(json.dumps({"this": results, "baseline": baseline}, indent=1))
    columns = [results] + ([baseline] if baseline else [])

    def cell(run, key, field):
        value = run.get(key, {})
        return f"{value[field]:.1f} ms" if isinstance(value, dict) and field in value else "—"

    head = "| measure | " + " | ".join(f"{c['label']}" for c in columns) + " | target |"
    rows = [head, "|---|" + "---|" * len(columns) + "---|"]
    for title, key, field, target in (
            ("GET /v1/jobs/{id}, no stream open: p50", "get_no_streams", "p50_ms", ""),
            ("GET /v1/jobs/{id}, no stream open: p99", "get_no_streams", "p99_ms", ""),
            (f"GET /v1/jobs/{{id}}, {results['streams']} streams open: p50", "get_with_streams", "p50_ms", ""),
            (f"GET /v1/jobs/{{id}}, {results['streams']} streams open: p99", "get_with_streams", "p99_ms", "< 50 ms"),
            ("/healthz while `jobs` is locked: p50", "healthz_with_table_lock", "p50_ms", ""),
            ("/healthz while `jobs` is locked: p99", "healthz_with_table_lock", "p99_ms", "< 50 ms")):
        rows.append(f"| {title} | " + " | ".join(cell(c, key, field) for c in columns) + f" | {target} |")
    rows.append("| database transactions/s with the streams open | "
                + " | ".join(str(c.get("db_transactions_per_second_with_streams", "—")) for c in columns) + " | |")
    rows.append("| events delivered per second, all streams together | "
                + " | ".join(str(c.get("events_delivered_per_second", "—")) for c in columns) + " | |")
    rows.append("| `/healthz` answers while `jobs` was locked | "
                + " | ".join(str(c.get("healthz_with_table_lock", {}).get("n", "—")) for c in columns) + " | |")
    rows.append("| streams that opened | " + " | ".join(str(c.get("streams_open", "—")) for c in columns) + " | |")
    text = "\n".join([
        "# API under load: open event streams and a locked table",
        "",
        f"Machine: {results['machine']}, shared by the API process, the stream client process, this script "
        f"and PostgreSQL; {results['date']}. Produced by `python bench/api_under_load.py`"
        + (" with `--baseline` (the same script run on the code before the change)." if baseline else "."),
        "",
        "The API runs as one uvicorn process on PostgreSQL (Redis broker). One job is `running`; a simulated "
        "worker writes two events a second to it. GETs are sequential on one keep-alive connection "
        f"({results['requests']} per measurement). Streams are SSE streams of that job, opened by a separate "
        "process. For `/healthz`, another session holds `LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE` for "
        f"{results['healthz_with_table_lock']['lock_seconds']:.0f} s while 45 `GET /v1/jobs/{{id}}` wait on it; "
        "`/healthz` is requested back to back, one at a time, until the lock is released.",
        "",
        *rows,
        "",
        "Why: every stream used to poll the database twice a second through the threadpool (one or two "
        "queries a poll), so the streams' queries queued ahead of every request; `GET /v1/jobs/{id}` "
        "was an `async` route calling the database on the event loop, so one blocked query stalled the whole "
        "server, `/healthz` included. Now one poller per streamed job (api/event_hub.py) feeds all its "
        "streams, blocking routes are plain `def` (threadpool), and `/healthz` touches neither the database "
        "nor the threadpool.",
        "",
    ])
    (out / "api_under_load.md").write_text(text)
    print(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--streams-child":
        streams_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--lock-seconds", type=float, default=8.0)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--baseline", type=Path, help="an earlier run's api_under_load.json to compare with")
    parser.add_argument("--json-only", type=Path, help="write this run's figures here and nothing else")
    args = parser.parse_args()
    results = measure(args)
    if args.json_only:
        args.json_only.write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return
    baseline = None
    if args.baseline:
        data = json.loads(args.baseline.read_text())
        baseline = data.get("this", data)
    write(results, baseline, ROOT / "bench" / "results")


if __name__ == "__main__":
    main()
