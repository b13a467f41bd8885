"""Dashboard benchmark: what watching costs, and how fast a long job's page draws.

Starts `rigl serve` (embedded defaults, one worker) on loopback and Debian's Chromium (Playwright):
1. training speed watched vs unwatched: the same job with no browser and with 3 dashboard tabs
   live on its page (SSE + 2 s polling each), interleaved, `train_seconds` from the job result;
2. page load of a finished long job (metrics event every step): time from navigation until every
   chart holds all its points (the SSE replay of the whole history), median of repeats;
3. bytes the browser downloads for the dashboard itself.

    python bench/dashboard.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.service import free_port, wait_for  # noqa: E402

WATCH_JOB = {"model": {"name": "mlp"}, "dataset": {"name": "digits"},
             "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "schedule": {"delta_t": 50}},
             "training": {"epochs": 600, "batch_size": 64, "log_every_steps": 5}}
LONG_JOB = {**WATCH_JOB, "training": {"epochs": 200, "batch_size": 64, "log_every_steps": 1}}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_job(base: str, job_id: str, timeout: float = 900) -> dict:
    def done():
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, interval=0.5, what=job_id)


def submit(base: str, spec: dict) -> str:
    response = httpx.post(f"{base}/v1/jobs", json=spec, timeout=30)
    response.raise_for_status()
    return response.json()["id"]


def chromium_cpu_seconds() -> float:
    """User + system CPU time of every Chromium process now alive (from /proc)."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        if name.startswith(("chromium", "chrome", "headless_shell")):
            fields = text[text.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def run_watched(base: str, browser, viewers: int) -> tuple[float, float]:
    """(train_seconds, Chromium CPU seconds spent while the job ran)."""
    cpu_before = chromium_cpu_seconds()
    job_id = submit(base, WATCH_JOB)
    pages = []
    for _ in range(viewers):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{base}/#/jobs/{job_id}")
        pages.append(page)
    job = wait_job(base, job_id)
    cpu = chromium_cpu_seconds() - cpu_before
    for page in pages:
        page.wait_for_selector(".toolbar .status:text('succeeded')", timeout=60_000)
        page.close()
    assert job["status"] == "succeeded", job
    return job["result"]["train_seconds"], cpu


def page_load_seconds(base: str, browser, job_id: str, train_points: int) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    started = time.perf_counter()
    page.goto(f"{base}/#/jobs/{job_id}")
    page.wait_for_function(
        """n => { const p = document.querySelector('#chart-loss polyline.series');
                  return p && +p.getAttribute('data-n') >= n; }""",
        arg=train_points, timeout=120_000, polling=50)
    page.wait_for_selector("#chart-density rect.bar")
    elapsed = time.perf_counter() - started
    page.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard.md")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install chromium)")
    tmp = Path(tempfile.mkdtemp(prefix="rigl-dash-bench-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    env.update(RIGL_DATA_DIR=str(tmp / "data"), RIGL_EVENT_EVERY_STEPS="1")
    server = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200 if _up(base) else False, 90,
                 what="rigl serve")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            run_watched(base, browser, 0)  # warm-up (imports, caches), discarded
            unwatched, watched, browser_cpu = [], [], []
            for repeat in range(args.repeats):
                order = [0, 3] if repeat % 2 == 0 else [3, 0]
                for viewers in order:
                    seconds, cpu = run_watched(base, browser, viewers)
                    (watched if viewers else unwatched).append(seconds)
                    if viewers:
                        browser_cpu.append(cpu)
                print(f"repeat {repeat}: unwatched {unwatched[-1]:.2f}s watched {watched[-1]:.2f}s "
                      f"(Chromium CPU {browser_cpu[-1]:.2f}s)", flush=True)

            long_id = submit(base, LONG_JOB)
            long_job = wait_job(base, long_id)
            events = httpx.get(f"{base}/v1/jobs/{long_id}/metrics", timeout=60).json()
            n_train, n_eval, n_updates = len(events["train"]), len(events["eval"]), len(events["mask_updates"])
            loads = [page_load_seconds(base, browser, long_id, n_train) for _ in range(args.repeats + 2)]

            page = browser.new_page()
            sizes = {}
            page.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if "/static/" in r.url
                    or r.url.rstrip("/") == base else None)
            page.goto(base + "/")
            page.wait_for_selector("#jobs-table")
            page.close()
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    ratios = [w / u for w, u in zip(watched, unwatched)]
    total_bytes = sum(sizes.values())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [
        "# Dashboard: cost of watching, page load of a long job",
        "",
        f"Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}. Machine: {os.cpu_count()} cores, {cpu}, "
        f"Python {platform.python_version()}, {subprocess.run([chromium, '--version'], capture_output=True, text=True).stdout.strip()} "
        f"headless via Playwright. `rigl serve` with embedded defaults (SQLite, filesystem broker, one worker), "
        "`RIGL_EVENT_EVERY_STEPS=1`, browser and server on the same 2 cores.",
        "",
        "## Training speed with 3 live dashboard tabs",
        "",
        f"Job: {json.dumps(WATCH_JOB)} ({args.repeats} repeats, interleaved, order alternating; one warm-up "
        "discarded). Time = the job's `train_seconds`.",
        "",
        "| | median train_seconds | all |",
        "|---|---|---|",
        f"| no viewer | {statistics.median(unwatched):.2f} | {', '.join(f'{v:.2f}' for v in unwatched)} |",
        f"| 3 dashboard tabs | {statistics.median(watched):.2f} | {', '.join(f'{v:.2f}' for v in watched)} |",
        "",
        f"Watched / unwatched, median of paired ratios: **{statistics.median(ratios):.3f}×** "
        f"(per repeat: {', '.join(f'{r:.3f}' for r in ratios)}). Chromium's CPU time while the watched job "
        f"ran (3 tabs together): median {statistics.median(browser_cpu):.2f} s "
        f"(all: {', '.join(f'{v:.2f}' for v in browser_cpu)}); the browser shares the 2 cores with training "
        "here, which a user's own machine would not.",
        "",
        "## Page load of a finished long job",
        "",
        f"Job: {json.dumps(LONG_JOB)}: {long_job['progress']['step']} steps; the page replays "
        f"{n_train} train points, {n_eval} evaluations and {n_updates} mask updates over SSE.",
        "",
        f"Navigation until every loss point is drawn and the density chart is up: median "
        f"**{statistics.median(loads):.2f} s** (all: {', '.join(f'{v:.2f}' for v in loads)}).",
        "",
        "## Dashboard download",
        "",
        f"{len(sizes)} files, **{total_bytes / 1024:.1f} KiB** uncompressed, all from the server itself "
        "(no CDN): " + ", ".join(f"`{u.replace(base, '') or '/'}` {s / 1024:.1f} KiB" for u, s in sorted(sizes.items())) + ".",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _up(base: str) -> bool:
    try:
        httpx.get(f"{base}/healthz", timeout=2)
        return True
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
