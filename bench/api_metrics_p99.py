"""API latency with Prometheus metrics on and off, side by side (issue 15, observability).

Starts three uvicorn processes of the API on one SQLite data directory (one submitted job):
- `metrics off`: RIGL_METRICS=0 (no middleware, no /metrics), access log not emitted (no log handler);
- `metrics on`: the default (latency histogram middleware, /metrics);
- `metrics on + JSON access log`: as `rigl serve` runs it with RIGL_LOG_FORMAT=json (lines to a file).
Every repeat times `--requests` sequential GETs on one keep-alive connection per server and route,
the servers taking turns within a repeat so that load from other processes on the machine falls on all
of them alike; the table gives the median over repeats of each repeat's p50 and p99. It also times
`GET /metrics` itself (database counts cached for 5 s, so most scrapes read the cache).

    python bench/api_metrics_p99.py [--requests 1000] [--repeats 5]

Writes bench/results/api_metrics_p99.md (and .json next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.service import JOB, free_port, wait_ready  # noqa: E402

CONFIGS = (("metrics off", {"RIGL_METRICS": "0"}, "api.app:create_app"),
           ("metrics on", {"RIGL_METRICS": "1"}, "api.app:create_app"),
           ("metrics on + JSON access log", {"RIGL_METRICS": "1", "RIGL_LOG_FORMAT": "json"},
            "bench.api_metrics_p99:logged_app"))


ASGI = {"metrics off": (False, False), "metrics on": (True, False), "metrics on + JSON access log": (True, True)}


def logged_app():
    """The app with `rigl serve`'s logging (access log on), its lines going to BENCH_LOG_FILE."""
    from api.app import create_app
    from service_common.log_context import configure_logging
    from store.settings import get_settings

    configure_logging(get_settings().log_format, stream=open(os.environ["BENCH_LOG_FILE"], "a", buffering=1))
    return create_app()


def start(data_dir: Path, env_extra: dict, factory: str, log: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    env.update(RIGL_DATA_DIR=str(data_dir), RIGL_AUTH="false", BENCH_LOG_FILE=str(log), PYTHONPATH=str(ROOT),
               **env_extra)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
                                "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=open(log.with_suffix(".err"), "ab"),
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 90, process, what=factory)
    return process, url


def asgi_cost(path: str, count: int, metrics: bool, log_to: Path | None, data_dir: Path) -> float:
    """CPU µs per request of the app called directly (no socket, no uvicorn): the middleware's own cost,
    which scheduling noise on a shared machine hides in wall-clock percentiles."""
    import asyncio
    import logging

    from api.app import create_app
    from service_common.log_context import configure_logging
    from store.settings import Settings

    handler = configure_logging("json", stream=open(log_to, "a")) if log_to else None
    app = create_app(Settings(data_dir=data_dir, metrics=metrics), enqueue=lambda job_id: None, reaper=False)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    async def run() -> float:
        for _ in range(200):
            await app(dict(scope), receive, send)
        started = time.process_time()
        for _ in range(count):
            await app(dict(scope), receive, send)
        return (time.process_time() - started) / count * 1e6

    try:
        return asyncio.run(run())
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            logging.getLogger().setLevel(logging.WARNING)


def timed(client: httpx.Client, path: str, count: int) -> list[float]:
    client.get(path)
    out = []
    for _ in range(count):
        t = time.perf_counter()
        response = client.get(path)
        out.append(time.perf_counter() - t)
        assert response.status_code == 200, (path, response.status_code)
    return out


def p(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100)[q - 1] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "api_metrics_p99.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rigl-metrics-bench-"))
    processes, urls = [], {}
    try:
        for name, env, factory in CONFIGS:
            process, url = start(work, env, factory, work / f"{len(processes)}.log")
            processes.append(process)
            urls[name] = url
        first = next(iter(urls.values()))
        job_id = httpx.post(f"{first}/v1/jobs", json=JOB, timeout=120).json()["id"]
        routes = ("/healthz", f"/v1/jobs/{job_id}")
        rounds = {(name, route): [] for name in urls for route in routes}
        scrapes: list[float] = []
        clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in urls.items()}
        for repeat in range(args.repeats):
            for route in routes:
                for name in (list(urls) if repeat % 2 == 0 else list(reversed(urls))):  # alternate who goes first
                    samples = timed(clients[name], route, args.requests)
                    rounds[(name, route)].append((p(samples, 50), p(samples, 99)))
            scrapes += timed(clients["metrics on"], "/metrics", 50)
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        lines = json.dumps({"requests": args.requests, "repeats": args.repeats, "rounds": {
            f"{n} {r}": v for (n, r), v in rounds.items()}, "metrics_scrape_ms": {
            "p50": p(scrapes, 50), "p99": p(scrapes, 99)}}, indent=1)
        Path(args.out).with_suffix(".json").write_text(lines)
        costs = {name: [] for name in ASGI}
        for repeat in range(args.repeats):
            for name, (metrics, logged) in ASGI.items():
                costs[name].append(asgi_cost("/healthz", 20_000, metrics, work / "asgi.log" if logged else None,
                                             work / f"asgi-{repeat}"))
        write_markdown(Path(args.out), args, rounds, routes, scrapes, work, costs)
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
    print(Path(args.out).read_text())
    return 0


def write_markdown(out: Path, args, rounds: dict, routes, scrapes: list[float], work: Path, costs: dict) -> None:
    access_lines = sum(1 for _ in open(work / "2.log")) if (work / "2.log").exists() else 0
    names = [name for name, _, _ in CONFIGS]
    text = [
        "# API latency with Prometheus metrics on and off",
        "",
        f"`python bench/api_metrics_p99.py --requests {args.requests} --repeats {args.repeats}` on "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores shared with other work, Python "
        f"{platform.python_version()}; no GPU. Three uvicorn processes of the API (one worker each) on one "
        "SQLite data directory; sequential GETs on one keep-alive connection; the servers take turns within "
        "each repeat. Figures: median over repeats of each repeat's p50 / p99, in ms.",
        "",
        "| route | " + " | ".join(f"{n} p50 | {n} p99" for n in names) + " | p99 on − off |",
        "|---|" + "---:|" * (2 * len(names) + 1),
    ]
    for route in routes:
        cells, p99s = [], []
        for name in names:
            p50 = statistics.median(r[0] for r in rounds[(name, route)])
            p99 = statistics.median(r[1] for r in rounds[(name, route)])
            cells += [f"{p50:.2f}", f"{p99:.2f}"]
            p99s.append(p99)
        shown = route if route == "/healthz" else "/v1/jobs/{job_id}"
        text.append(f"| `GET {shown}` | " + " | ".join(cells) + f" | {p99s[1] - p99s[0]:+.2f} |")
    text += [
        "",
        f"`GET /metrics` itself (metrics on, {len(scrapes)} scrapes): p50 {p(scrapes, 50):.2f} ms, "
        f"p99 {p(scrapes, 99):.2f} ms.",
        f"The JSON access-log server wrote {access_lines} lines.",
        "",
        "In process, without sockets or uvicorn (`GET /healthz` on the ASGI app called directly, 20,000 "
        "requests, CPU time per request, median of the repeats), the cost of the middleware itself:",
        "",
        "| configuration | CPU µs per request | over metrics off |",
        "|---|---:|---:|",
        *[f"| {name} | {statistics.median(v):.1f} | "
          f"{statistics.median(v) - statistics.median(costs['metrics off']):+.1f} |" for name, v in costs.items()],
        "",
        "Per-repeat figures are in api_metrics_p99.json.",
    ]
    out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    sys.exit(main())
