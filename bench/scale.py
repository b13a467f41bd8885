"""Scale-out by simulation: N workers and their jobs on one PostgreSQL, one Redis and K API processes.

The parts are the real ones: the API (`uvicorn --workers K`, the processes share one port the way
replicas share a load balancer's address), PostgreSQL and Redis on this machine, the real reaper
(store/reaper.py, with its leader lock) and simulated workers that go through the worker's own code:
they pop Celery's message from the Redis queue, `JobStore.claims.claim` the fairest job, run the real
`StoreCallback` (worker/runner.py: batched events, the Heartbeat thread renewing the lease and
reading the cancel flag, periodic resume checkpoints through `save_resume_checkpoint`), and end with
`publish` + `add_checkpoint` + `finish` (or `requeue` on stop, as SIGTERM does). Only the training
step is replaced: a sleep at `--step-rate` steps per second, with a metrics event every
RIGL_EVENT_EVERY_STEPS steps, an evaluation every `--eval-every` and a mask update every
`--mask-every` steps. A share of workers dies mid-job (heartbeat and event buffer gone, nothing
written): the reaper must requeue each such job once.

Time-scaling (`--points N:F`): at F > 1 every clock of the simulation runs F times slower (step rate
/ F; heartbeat and event-flush interval RIGL_CANCEL_POLL_SECONDS, lease, reaper interval, checkpoint
interval and job length × F), so N simulated workers hold N running jobs, leases and rows but load
the database like N / F real ones; the table reports both. Event lag then has a worker part F times
the real one (its batching interval); the API's part (written → visible) is reported on its own.

    python bench/scale.py                     # the sweep of bench/results/scale.md (~13 min on 2 cores)
    python bench/scale.py --points 10:1 --seconds 20 --seed-jobs 2000 --seed-steps ""   # a quick look
    python bench/scale.py --report AFTER.json [BEFORE.json]   # tables (…tables.md) and plot (….png) again

Each simulated-worker process (`--sim-procs`) runs many workers as threads over one shared connection
pool (RIGL_DB_POOL_SIZE), the way PgBouncer multiplexes many workers onto few server connections.
Results go to `--out` (bench/results/scale.json) and, with --report, its tables and plot. Needs
PostgreSQL and Redis on 127.0.0.1 (a database and a queue of its own, dropped afterwards).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OWNERS = 5


# =============================================================================== simulated workers (child)
def message_job_id(raw: bytes) -> str:
    """The job id of a Celery protocol-2 message as kombu's Redis transport stores it."""
    message = json.loads(raw)
    args = json.loads(base64.b64decode(message["body"]))[0]
    return args[0]


class FakeTrainer:
    """What StoreCallback and save_resume_checkpoint read of a Trainer; the step is a sleep."""

    def __init__(self, total_steps: int):
        self.step, self.total_steps, self.eval_history, self.stopped_early = 0, total_steps, [], False
        self.device = FakeDevice()  # the worker's Prometheus meter (worker/metrics.py) labels by it
        self.spec = SimpleNamespace(training=SimpleNamespace(batch_size=256))

    def save_checkpoint(self, path: Path) -> Path:
        path.write_bytes(b"sim-checkpoint %d" % self.step)
        return path


class FakeDevice:
    type = "sim"

    def __str__(self) -> str:
        return "sim"


class FakeUpdate:
    def __init__(self, step: int, extra: dict):
        self.step, self.extra = step, extra

    def to_dict(self) -> dict:
        return {"step": self.step, "drop_fraction": 0.3, "churn": 0.01, "layers": [{"name": "fc", "moved": 10}],
                **self.extra}


def sim_main(config_path: str) -> None:
    import redis

    from api.context import celery_enqueue
    from store.artifacts import Artifacts
    from store.dispatch import dispatch
    from store.jobs import JobStore
    from store.leader import LeaderLock
    from store.reaper import Reaper
    from store.settings import get_settings
    from store.sweeps import release_held
    from worker.runner import StoreCallback, publish, save_resume_checkpoint

    from worker.metrics import series

    series()  # the worker's Prometheus series, made once before the threads race to make them
    cfg = json.loads(Path(config_path).read_text())
    settings = get_settings().resolved()
    store = JobStore(settings.database_url)
    artifacts = Artifacts.from_settings(settings)
    enqueue = celery_enqueue(settings)
    broker = redis.Redis.from_url(settings.broker_url)
    keys = [settings.queue] + [f"{settings.queue}\x06\x16{p}" for p in (3, 6, 9)]
    scale, proc = cfg["scale"], cfg["proc"]
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"claims": 0, "claim_ms": [], "empty_claims": 0, "finished": {}, "kills": [], "written": {},
             "errors": [], "requeued_on_stop": 0, "reaper_ms": [], "lost_lease": 0, "heartbeat_ms": [],
             "flush_ms": [], "emit_to_write_ms": []}
    counter = iter(range(10**9))

    class SimCallback(StoreCallback):
        """StoreCallback as it is; the flush stamps when the batch went to the database and counts what was
        written (for the lost / duplicated check), nothing else."""

        def flush(self, force: bool = False) -> None:
            batch = list(self.pending)
            now = time.time()
            for event in batch:
                if isinstance(event.get("data"), dict) and "sim_seq" in event["data"]:
                    event["data"]["sim_flush"] = now
            start = time.perf_counter()
            super().flush(force)
            if batch and not self.pending and not self.write_refused:
                with lock:
                    stats["flush_ms"].append((time.perf_counter() - start) * 1000)
                    written = stats["written"].setdefault(f"{self.job_id}:{self.attempt}", [])
                    for event in batch:
                        if isinstance(event.get("data"), dict) and "sim_seq" in event["data"]:
                            written.append(event["data"]["sim_seq"])
                            stats["emit_to_write_ms"].append((now - event["data"]["sim_emit"]) * 1000)

    def sim_data(job, step: int, **values) -> dict:
        return {**values, "step": step, "sim_emit": time.time(), "sim_attempt": job.attempt,
                "sim_seq": f"{proc}-{next(counter)}"}

    def run(job, token: str, rng: random.Random) -> None:
        steps_per_second = cfg["step_rate"] / scale
        total = max(10, int(rng.uniform(cfg["job_seconds"][0], cfg["job_seconds"][1]) * cfg["step_rate"]))
        trainer = FakeTrainer(total)
        callback = SimCallback(store, artifacts, job, token, settings)
        callback.heartbeat.start()
        die_at = None
        if rng.random() < cfg["kill_share"] and time.time() < cfg.get("kill_until", float("inf")):
            die_at = time.monotonic() + rng.uniform(2, cfg["kill_window"]) * 1.0
        try:
            resume = store.checkpoints.latest_checkpoint(job.id, "resume")
            if resume is not None:
                trainer.step = callback.step = resume.step
                callback.note(f"resumed from step {trainer.step}", data={"resumed_from_step": trainer.step})
                callback.flush(force=True)
            carry, last, stopped = 0.0, time.monotonic(), False
            while not stopped and trainer.step < total:
                time.sleep(cfg["tick"])
                now = time.monotonic()
                if (die_at is not None and now >= die_at and not stop.is_set()
                        and time.time() < cfg.get("kill_until", float("inf"))):  # the reaper's time to act
                    callback.heartbeat.stopping.set()  # the process is gone: no beat, no flush, no write
                    with lock:
                        stats["kills"].append({"job": job.id, "attempt": job.attempt, "at": time.time()})
                    return
                if stop.is_set():
                    callback.stop_requested.set()  # as SIGTERM: checkpoint and requeue at the next step
                carry += (now - last) * steps_per_second
                last = now
                due, carry = int(carry), carry - int(carry)
                for _ in range(max(due, 1 if stop.is_set() else 0)):
                    trainer.step += 1
                    callback.on_step(trainer, sim_data(job, trainer.step, loss=rng.random(), lr=0.1))
                    if trainer.step % cfg["eval_every"] == 0:
                        metrics = sim_data(job, trainer.step, epoch=trainer.step // cfg["eval_every"],
                                           val_accuracy=rng.random(), val_loss=rng.random())
                        trainer.eval_history.append(metrics)
                        callback.on_eval(trainer, metrics)
                    if trainer.step % cfg["mask_every"] == 0:
                        callback.on_mask_update(trainer, FakeUpdate(trainer.step, sim_data(job, trainer.step)))
                    if callback.should_stop(trainer) or trainer.step >= total:
                        stopped = callback.should_stop(trainer)
                        break
            callback.sync(trainer.step)
            if callback.lost_lease:
                with lock:
                    stats["lost_lease"] += 1
                return
            if stopped:
                save_resume_checkpoint(trainer, store, artifacts, job.id, token, job.attempt)
                if callback.shutdown and not callback.cancel:
                    if store.leases.requeue(job.id, token, f"worker process stopped (SIGTERM) at step {trainer.step}; "
                                                    "will resume"):
                        dispatch(store, enqueue, job.id)
                        with lock:
                            stats["requeued_on_stop"] += 1
                    return
                store.leases.finish(job.id, token, "cancelled", f"cancelled at step {trainer.step}")
                outcome = "cancelled"
            else:
                job_dir = artifacts.job_dir(job.id)
                for kind, name in (("dense", "model_dense.pt"), ("packed", "model_packed.pt")):
                    path = publish(store, job.id, token, job.attempt, job_dir / name,
                                   lambda p: p.write_bytes(b"sim export"), 0.0, artifacts)
                    store.checkpoints.add_checkpoint(job.id, kind, trainer.step, name, "0" * 64, path.stat().st_size,
                                         metrics=trainer.eval_history[-1] if trainer.eval_history else None,
                                         token=token)
                store.leases.finish(job.id, token, "succeeded", "succeeded", result={"steps": trainer.step})
                outcome = "succeeded"
            release_held(store, enqueue, settings.max_active_jobs_per_owner)
            with lock:
                stats["finished"][outcome] = stats["finished"].get(outcome, 0) + 1
        finally:
            callback.heartbeat.stop() if die_at is None or not callback.heartbeat.stopping.is_set() else None
            artifacts.release_job(job.id)

    def worker(index: int) -> None:
        rng = random.Random(f"{cfg['seed']}-{proc}-{index}")
        time.sleep(rng.uniform(0, cfg["ramp"]))
        name = f"sim{proc}-{index}@{os.uname().nodename}:{os.getpid()}"
        while not stop.is_set():
            try:
                item = broker.brpop(keys, timeout=1)
                if item is None:
                    continue
                start = time.perf_counter()
                job, token = store.claims.claim(message_job_id(item[1]), settings.max_attempts, settings.lease_seconds,
                                         worker=name)
                with lock:
                    stats["claim_ms"].append((time.perf_counter() - start) * 1000)
                    stats["claims" if job is not None else "empty_claims"] += 1
                if job is not None:
                    run(job, token, rng)
                    if stats["kills"] and stats["kills"][-1]["job"] == job.id and not stop.is_set():
                        time.sleep(cfg["restart_seconds"])  # the orchestrator restarts a dead worker
            except Exception as error:  # noqa: BLE001 - counted and shown; the worker goes on
                with lock:
                    stats["errors"].append(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
                time.sleep(1)

    class TimedReaper(Reaper):
        def run_once(self):
            start = time.perf_counter()
            held = self.lock is None or self.lock.held()
            result = super().run_once()
            if held:
                with lock:
                    stats["reaper_ms"].append((time.perf_counter() - start) * 1000)
            return result

    reaper = None
    if cfg["reaper"]:
        reaper = TimedReaper(store, enqueue, settings.lease_seconds, settings.reaper_interval_seconds,
                             lock=LeaderLock(settings.database_url, "reaper"),
                             max_active=settings.max_active_jobs_per_owner)
        reaper.start()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(cfg["workers"])]
    for thread in threads:
        thread.start()
    stop_file, deadline = Path(cfg["stop_file"]), time.monotonic() + cfg["max_seconds"]
    while not stop_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=max(5.0, 30 * scale))
    if reaper is not None:
        reaper.stop()
    stats["alive_after_stop"] = sum(t.is_alive() for t in threads)
    Path(cfg["out"]).write_text(json.dumps(stats))
    os._exit(0)  # heartbeat threads of abandoned (killed) runs are daemons; nothing else to wait for


# =============================================================================== orchestrator
def pct(samples: list[float], q: int = 99) -> float | None:
    if not samples:
        return None
    if len(samples) < 2:
        return round(samples[0], 1)
    return round(statistics.quantiles(samples, n=100)[q - 1], 1)


def seed(pg, target: int, events_per_job: int) -> float:
    """Bulk-insert finished jobs (and their events and checkpoint rows) up to `target` jobs: the history a
    busy service accumulates. Plain INSERT … SELECT generate_series: ~10 s per 100,000 jobs here."""
    have = pg.execute("SELECT count(*) FROM jobs").fetchone()[0]
    if have >= target:
        return 0.0
    start = time.perf_counter()
    spec = json.dumps({"model": {"name": "resnet50"}, "dataset": {"name": "imagefolder"},
                       "sparsity": {"method": "rigl", "sparsity": 0.9}, "training": {"epochs": 90}})
    first = pg.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()[0]
    pg.execute("""
        INSERT INTO jobs (id, owner, status, spec, resolved_spec, created_at, started_at, finished_at, step,
                          total_steps, devices, attempt, preemptions, cancel_requested, preempt_requested, method,
                          metrics, result, name)
        SELECT 'job_' || substr(md5(g::text || random()::text), 1, 20), 'owner' || (g %% %(owners)s::int),
               (ARRAY['succeeded','succeeded','succeeded','succeeded','succeeded','succeeded','succeeded',
                      'succeeded','failed','cancelled'])[1 + g %% 10],
               %(spec)s::json, %(spec)s::json, now() - make_interval(secs => (%(top)s::int - g) * 30.0),
               now() - make_interval(secs => (%(top)s::int - g) * 30.0),
               now() - make_interval(secs => (%(top)s::int - g) * 20.0),
               450450, 450450, 1, 1, 0, false, false, 'rigl',
               '{"loss": 1.2, "val_accuracy": 0.76}'::json, '{"steps": 450450}'::json, 'seeded ' || g
        FROM generate_series(%(lo)s::int, %(hi)s::int) g""",
               {"owners": OWNERS, "spec": spec, "top": target, "lo": have + 1, "hi": target})
    pg.execute("""
        INSERT INTO events (job_id, created_at, type, level, message, data)
        SELECT j.id, j.created_at, CASE WHEN k = 1 THEN 'status' WHEN k %% 5 = 0 THEN 'eval' ELSE 'metrics' END,
               'info', 'step ' || k * 1000, json_build_object('step', k * 1000, 'loss', 1.0 / k, 'lr', 0.1)
        FROM jobs j, generate_series(1, %(per)s::int) k WHERE j.seq > %(first)s::int""",
               {"per": events_per_job, "first": first})
    pg.execute("""
        INSERT INTO checkpoints (id, job_id, kind, step, filename, sha256, size, created_at)
        SELECT 'ckpt_' || substr(md5(j.id || k), 1, 20), j.id, k, 450450, 'model_' || k || '.pt',
               repeat('0', 64), 102000000, j.finished_at
        FROM jobs j, unnest(ARRAY['dense', 'packed']) k WHERE j.seq > %(first)s::int AND j.status = 'succeeded'""",
               {"first": first})
    pg.execute("ANALYZE")
    return time.perf_counter() - start


class Probes:
    """Client-side measurements while the workers run: each a thread, sequential requests."""

    def __init__(self, url: str, keys: dict, admin: str, pg_url: str, settings_env: dict, args):
        import httpx

        self.url, self.keys, self.admin, self.pg_url, self.args = url, keys, admin, pg_url, args
        self.httpx = httpx
        self.stop = threading.Event()
        self.samples = {k: [] for k in ("get", "list", "list_page2", "dashboard", "submit", "cancel",
                                        "lag_api", "lag_api_written", "lag_sse", "lag_sse_written")}
        self.errors: list[str] = []
        self.submitted: list[tuple[str, str]] = []  # (job id, owner)
        self.lock = threading.Lock()

    def client(self, owner: str | None):
        key = self.keys[owner] if owner else self.admin
        return self.httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {key}"})

    def timed(self, name: str, call):
        start = time.perf_counter()
        try:
            response = call()
            ok = response.status_code < 400
        except self.httpx.HTTPError as error:
            ok, response = False, error
        elapsed = (time.perf_counter() - start) * 1000
        with self.lock:
            if ok:
                self.samples[name].append(elapsed)
            else:
                self.errors.append(f"{name}: {getattr(response, 'status_code', response)}")
        return response if ok else None

    def running_jobs(self, limit: int = 50) -> list[tuple[str, str]]:
        import psycopg

        with psycopg.connect(self.pg_url) as pg:
            return pg.execute("SELECT id, owner FROM jobs WHERE status = 'running' ORDER BY random() LIMIT %s",
                              (limit,)).fetchall()

    def get_loop(self) -> None:
        clients = {o: self.client(o) for o in self.keys}
        jobs = []
        while not self.stop.is_set():
            if not jobs:
                jobs = self.running_jobs() or self.submitted[-50:]
                if not jobs:
                    time.sleep(0.2)
                    continue
            job_id, owner = random.choice(jobs)
            self.timed("get", lambda: clients[owner].get(f"/v1/jobs/{job_id}"))
            time.sleep(0.02)
            if random.random() < 0.01:
                jobs = []

    def list_loop(self) -> None:
        clients = {o: self.client(o) for o in self.keys}
        dashboard = self.client(None)
        n = 0
        while not self.stop.is_set():
            owner = f"owner{n % OWNERS}"
            page = self.timed("list", lambda: clients[owner].get("/v1/jobs", params={"limit": 20}))
            if page is not None and page.json()["data"]:
                last = page.json()["data"][-1]["id"]
                self.timed("list_page2", lambda: clients[owner].get("/v1/jobs", params={"limit": 20, "after": last}))
            if n % 3 == 0:  # the dashboard's first page as an admin sees it (api/static/app.js: limit 50)
                self.timed("dashboard", lambda: dashboard.get("/v1/jobs", params={"limit": 50}))
            n += 1
            time.sleep(0.1)

    def submit_loop(self, rate: float, body: dict) -> None:
        clients = {o: self.client(o) for o in self.keys}
        n, start = 0, time.monotonic()
        while not self.stop.is_set():
            owner = f"owner{n % OWNERS}"
            response = self.timed("submit", lambda: clients[owner].post("/v1/jobs", json=body))
            if response is not None:
                job_id = response.json()["id"]
                with self.lock:
                    self.submitted.append((job_id, owner))
            n += 1
            if random.random() < self.args.cancel_share:  # a user changes their mind about a running job
                running = self.running_jobs(1)
                if running:
                    job_id, owner = running[0]
                    self.timed("cancel", lambda: clients[owner].post(f"/v1/jobs/{job_id}/cancel"))
            wait = start + n / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)

    def record_lag(self, name: str, data: dict, since: float) -> None:
        """Only events emitted after the reader started following (`since`): not a resumed job's history."""
        if isinstance(data, dict) and "sim_emit" in data and data["sim_emit"] >= since:
            now = time.time()
            with self.lock:
                self.samples[name].append((now - data["sim_emit"]) * 1000)
                if "sim_flush" in data:
                    self.samples[name + "_written"].append((now - data["sim_flush"]) * 1000)

    def events_loop(self) -> None:
        """A client polling `GET …/events?after=` of 20 running jobs every 0.25 s (lag includes that)."""
        clients = {o: self.client(o) for o in self.keys}
        cursors: dict = {}
        since = time.time()
        while not self.stop.is_set():
            if len(cursors) < 20:
                for job_id, owner in self.running_jobs(20 - len(cursors)):
                    page = clients[owner].get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
                    cursors[job_id] = (owner, page[-1]["id"] if page else 0)
            for job_id, (owner, cursor) in list(cursors.items()):
                response = clients[owner].get(f"/v1/jobs/{job_id}/events", params={"after": cursor, "limit": 1000})
                if response.status_code != 200:
                    del cursors[job_id]
                    continue
                for event in response.json()["data"]:
                    self.record_lag("lag_api", event["data"], since)
                    cursor = event["id"]
                    if event["type"] == "status" and event["data"]["status"] not in ("running", "cancelling"):
                        cursor = None
                if cursor is None:
                    del cursors[job_id]
                else:
                    cursors[job_id] = (owner, cursor)
            time.sleep(0.25)

    def sse_loop(self, slot: int) -> None:
        """One SSE stream at a time, of a running job; a new one when it ends."""
        while not self.stop.is_set():
            running = self.running_jobs(1)
            if not running:
                time.sleep(0.5)
                continue
            job_id, owner = running[0]
            since = time.time()
            try:
                with self.client(owner) as client, client.stream("GET", f"/v1/jobs/{job_id}/events/stream",
                                                                  timeout=self.httpx.Timeout(30, read=60)) as r:
                    for line in r.iter_lines():
                        if self.stop.is_set():
                            break
                        if line.startswith("data: "):
                            self.record_lag("lag_sse", json.loads(line[6:])["data"], since)
            except self.httpx.HTTPError as error:
                with self.lock:
                    self.errors.append(f"sse: {type(error).__name__}")
                time.sleep(0.5)


ROLES = ("pg", "redis", "api", "sim")


def cpu_seconds() -> dict:
    """CPU seconds (user + system, all threads) by role: PostgreSQL's backends, Redis, the API processes
    (uvicorn's supervisor and the workers it spawned), the simulated-worker processes."""
    procs, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        own = int(fields[11]) + int(fields[12])
        if comm == "postgres" and int(fields[1]) == 1:  # the postmaster: + its ended backends' CPU (cutime, cstime)
            own += int(fields[13]) + int(fields[14])
        procs[int(pid)] = (comm, cmd, int(fields[1]), own / tick)
    api_roots = {pid for pid, (_, cmd, _, _) in procs.items() if "api.app:create_app" in cmd}
    totals = dict.fromkeys(ROLES, 0.0)
    totals["bench"] = procs.get(os.getpid(), (None, None, None, 0.0))[3]  # this process: the client probes
    for pid, (comm, cmd, ppid, cpu) in procs.items():
        role = ("pg" if comm == "postgres" else "redis" if comm == "redis-server" else
                "api" if pid in api_roots or ppid in api_roots else "sim" if "--sim-child" in cmd else None)
        if role:
            totals[role] += cpu
    return totals


def counters(pg, dbname: str, broker) -> dict:
    row = pg.execute("SELECT tup_inserted, xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                     (dbname,)).fetchone()
    return {"t": time.monotonic(), "inserted": row[0], "xacts": row[1], "cpu": cpu_seconds(),
            "redis_cmds": broker.info("stats")["total_commands_processed"]}


def machine_cpu() -> tuple[float, float]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def run_point(n: int, scale: float, args, env: dict, url: str, keys: dict, admin: str, pg_url: str, dbname: str,
              tmp: Path, broker) -> dict:
    import psycopg

    from helpers.service import JOB

    point_env = {**env, "RIGL_CANCEL_POLL_SECONDS": str(1.0 * scale),
                 "RIGL_LEASE_SECONDS": str(args.lease * scale),
                 "RIGL_REAPER_INTERVAL_SECONDS": str(args.reaper_interval * scale),
                 "RIGL_CHECKPOINT_MIN_SECONDS": str(args.checkpoint_min_seconds * scale)}
    probes = Probes(url, keys, admin, pg_url, point_env, args)
    with psycopg.connect(pg_url, autocommit=True) as pg:
        first_event = pg.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        waiting = pg.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'requeued')").fetchone()[0]
    # enough work queued for every worker, submitted through the API (a burst, not measured)
    burst = max(0, int(n * 1.2) - waiting)
    from concurrent.futures import ThreadPoolExecutor

    def submit(i):
        with probes.client(f"owner{i % OWNERS}") as c:
            return c.post("/v1/jobs", json=JOB).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(submit, range(burst)))
    assert all(code == 201 for code in codes), f"burst submissions failed: {set(codes)}"
    tag = f"{n}x{scale:g}"
    stop_file = tmp / f"stop-{tag}"
    procs, outs = [], []
    per = [n // args.sim_procs + (i < n % args.sim_procs) for i in range(args.sim_procs)]
    for proc, count in enumerate(per):
        if not count:
            continue
        out = tmp / f"sim-{tag}-{proc}.json"
        config = tmp / f"sim-{tag}-{proc}.cfg.json"
        config.write_text(json.dumps({
            "proc": proc, "workers": count, "scale": scale, "step_rate": args.step_rate, "tick": 0.5 * scale,
            "eval_every": args.eval_every, "mask_every": args.mask_every, "kill_share": args.kill_share,
            "kill_window": args.seconds * 0.4,
            "job_seconds": [args.job_seconds_min * scale, args.job_seconds_max * scale],
            "restart_seconds": 2.0, "ramp": min(10.0, args.seconds / 4), "seed": args.seed, "reaper": proc == 0,
            "stop_file": str(stop_file), "out": str(out), "max_seconds": args.seconds * 6 + 120,
            "kill_until": time.time() + min(10.0, args.seconds / 4) + 3 + args.seconds}))
        log = open(tmp / f"sim-{tag}-{proc}.log", "ab")
        pool_size, overflow = args.sim_pool.split(":")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--sim-child", str(config)],
                                      env={**point_env, "RIGL_DB_POOL_SIZE": pool_size,
                                           "RIGL_DB_MAX_OVERFLOW": overflow}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        outs.append(out)
    warmup = min(10.0, args.seconds / 4) + 3
    time.sleep(warmup)
    threads = [threading.Thread(target=probes.get_loop), threading.Thread(target=probes.list_loop),
               threading.Thread(target=probes.submit_loop, args=(args.arrival_rate, JOB)),
               threading.Thread(target=probes.events_loop)]
    threads += [threading.Thread(target=probes.sse_loop, args=(i,)) for i in range(args.sse_streams)]
    with psycopg.connect(pg_url, autocommit=True) as pg:
        before, cpu0 = counters(pg, dbname, broker), machine_cpu()
        for thread in threads:
            thread.daemon = True
            thread.start()
        running = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(2)
            running.append(pg.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0])
        after, cpu1 = counters(pg, dbname, broker), machine_cpu()
    probes.stop.set()
    # the reaper gets a lease and two sweeps to bring back the last killed jobs, then the workers stop
    time.sleep(args.lease * scale + 2 * args.reaper_interval * scale + 2)
    stop_file.touch()
    for process in procs:
        try:
            process.wait(timeout=60 * scale + 60)
        except subprocess.TimeoutExpired:
            process.kill()
    sims = [json.loads(out.read_text()) for out in outs if out.exists()]
    for thread in threads:
        thread.join(timeout=5)
    elapsed = after["t"] - before["t"]
    total_cpu, idle_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    merged = {k: [x for s in sims for x in s[k]] for k in ("claim_ms", "reaper_ms", "flush_ms", "emit_to_write_ms",
                                                           "kills", "errors")}
    written = {}
    for s in sims:
        written.update(s["written"])
    with psycopg.connect(pg_url, autocommit=True) as pg:
        seen = pg.execute("SELECT data->>'sim_seq', count(*) FROM events WHERE id > %s AND data->>'sim_seq' IS NOT "
                          "NULL GROUP BY 1", (first_event,)).fetchall()
        reaped = dict(pg.execute("SELECT job_id, count(*) FROM events WHERE id > %s AND type = 'status' AND "
                                 "message LIKE 'worker lost at step %%' GROUP BY 1", (first_event,)).fetchall())
        db_mb = pg.execute("SELECT pg_database_size(current_database()) / 1e6").fetchone()[0]
        db_mb = float(db_mb)
        jobs_total = pg.execute("SELECT count(*) FROM jobs").fetchone()[0]
        events_total = pg.execute("SELECT count(*) FROM events").fetchone()[0]
    counts = dict(seen)
    written_seqs = [seq for seqs in written.values() for seq in seqs]
    lost = sum(1 for seq in written_seqs if seq not in counts)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    kills_by_job: dict = {}
    for kill in merged["kills"]:
        kills_by_job[kill["job"]] = kills_by_job.get(kill["job"], 0) + 1
    requeue_ok = sum(1 for job, k in kills_by_job.items() if reaped.get(job, 0) == k)
    not_once = [{"job": job, "killed": k, "reaped": reaped.get(job, 0)} for job, k in kills_by_job.items()
                if reaped.get(job, 0) != k]
    s = probes.samples
    return {
        "workers": n, "scale": scale, "real_worker_equivalent": round(n / scale, 1), "seconds": round(elapsed, 1),
        "running_mean": round(statistics.mean(running), 1) if running else 0,
        "get_p50_ms": pct(s["get"], 50), "get_p99_ms": pct(s["get"]), "get_n": len(s["get"]),
        "list_p99_ms": pct(s["list"]), "list_page2_p99_ms": pct(s["list_page2"]), "list_n": len(s["list"]),
        "dashboard_p50_ms": pct(s["dashboard"], 50), "dashboard_p99_ms": pct(s["dashboard"]),
        "submit_p50_ms": pct(s["submit"], 50), "submit_p99_ms": pct(s["submit"]), "submit_n": len(s["submit"]),
        "cancel_n": len(s["cancel"]),
        "lag_api_p99_ms": pct(s["lag_api"]), "lag_api_written_p99_ms": pct(s["lag_api_written"]),
        "lag_sse_p50_ms": pct(s["lag_sse"], 50), "lag_sse_p99_ms": pct(s["lag_sse"]),
        "lag_sse_written_p99_ms": pct(s["lag_sse_written"]), "lag_n": len(s["lag_sse"]) + len(s["lag_api"]),
        "emit_to_write_p99_ms": pct(merged["emit_to_write_ms"]), "flush_p99_ms": pct(merged["flush_ms"]),
        "claim_p99_ms": pct(merged["claim_ms"]), "claims": sum(x["claims"] for x in sims),
        "reaper_p50_ms": pct(merged["reaper_ms"], 50), "reaper_max_ms": round(max(merged["reaper_ms"]), 1)
        if merged["reaper_ms"] else None,
        "pg_inserts_per_s": round((after["inserted"] - before["inserted"]) / elapsed, 1),
        "pg_xacts_per_s": round((after["xacts"] - before["xacts"]) / elapsed, 1),
        "pg_cpu_cores": round((after["cpu"]["pg"] - before["cpu"]["pg"]) / elapsed, 2),
        "cpu_cores": {role: round((after["cpu"][role] - before["cpu"][role]) / elapsed, 2) for role in after["cpu"]},
        "machine_busy": round(1 - idle_cpu / total_cpu, 3) if total_cpu else None,
        "redis_ops_per_s": round((after["redis_cmds"] - before["redis_cmds"]) / elapsed, 1),
        "events_written": len(written_seqs), "events_lost": lost, "events_duplicated": duplicated,
        "killed": len(merged["kills"]), "killed_requeued_once": requeue_ok, "killed_not_requeued_once": not_once[:10],
        "finished": {k: sum(x["finished"].get(k, 0) for x in sims) for k in ("succeeded", "cancelled")},
        "requeued_on_stop": sum(x["requeued_on_stop"] for x in sims), "lost_lease": sum(x["lost_lease"] for x in sims),
        "worker_errors": len(merged["errors"]), "worker_error_examples": sorted(set(merged["errors"]))[:5],
        "client_errors": len(probes.errors), "client_error_examples": sorted(set(probes.errors))[:5],
        "jobs_in_db": jobs_total, "events_in_db": events_total, "db_mb": round(db_mb, 1),
    }


def list_scan(url: str, keys: dict, admin: str, rounds: int = 60) -> dict:
    """List p99 with nothing else running: an owner's first page, its second (keyset), the dashboard's."""
    import httpx

    out = {}
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {keys['owner0']}"}) as c, \
            httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {admin}"}) as d:
        for name, call in (("list", lambda: c.get("/v1/jobs", params={"limit": 20})),
                           ("list_running", lambda: c.get("/v1/jobs", params={"limit": 20, "status": "running"})),
                           ("dashboard", lambda: d.get("/v1/jobs", params={"limit": 50})),
                           ("dashboard_failed", lambda: d.get("/v1/jobs", params={"limit": 50, "status": "failed"}))):
            call()
            samples = []
            for _ in range(rounds):
                start = time.perf_counter()
                assert call().status_code == 200
                samples.append((time.perf_counter() - start) * 1000)
            out[f"{name}_p99_ms"] = pct(samples)
    return out

ROWS = [  # (label, key or function of a point, target)
    ("simulated workers × time-scale", lambda p: f"{p['workers']} × {p['scale']:g}", ""),
    ("database load in real workers (N / scale)", "real_worker_equivalent", ""),
    ("jobs running (mean)", "running_mean", ""),
    ("GET /v1/jobs/{id} p50 / p99 (ms)", lambda p: f"{p['get_p50_ms']} / **{p['get_p99_ms']}**", "p99 < 50"),
    ("owner's list, page 1 / page 2 p99 (ms)", lambda p: f"**{p['list_p99_ms']}** / {p['list_page2_p99_ms']}", "< 50"),
    ("dashboard list (admin, 50) p50 / p99 (ms)", lambda p: f"{p['dashboard_p50_ms']} / {p['dashboard_p99_ms']}", ""),
    ("POST /v1/jobs p50 / p99 (ms)", lambda p: f"{p['submit_p50_ms']} / {p['submit_p99_ms']}", ""),
    ("event lag, emitted → SSE p50 / p99 (ms)", lambda p: f"{p['lag_sse_p50_ms']} / **{p['lag_sse_p99_ms']}**",
     "p99 < 2000"),
    ("event lag, written → SSE p99 (ms)", "lag_sse_written_p99_ms", ""),
    ("event lag, emitted → GET …/events p99 (ms)", "lag_api_p99_ms", ""),
    ("worker: emitted → written p99 (ms)", "emit_to_write_p99_ms", ""),
    ("worker: event flush p99 (ms)", "flush_p99_ms", ""),
    ("worker: claim p99 (ms)", "claim_p99_ms", ""),
    ("reaper pass p50 / max (ms)", lambda p: f"{p['reaper_p50_ms']} / {p['reaper_max_ms']}", ""),
    ("PostgreSQL rows inserted/s", "pg_inserts_per_s", ""),
    ("PostgreSQL transactions/s", "pg_xacts_per_s", ""),
    ("CPU cores: PostgreSQL / API / simulators / clients",
     lambda p: "{pg} / {api} / {sim} / {bench}".format(**{"bench": "–", **p["cpu_cores"]}) if "cpu_cores" in p
     else f"{p['pg_cpu_cores']} / – / – / –", ""),
    ("machine busy (both cores)", lambda p: f"{p['machine_busy']:.0%}", ""),
    ("Redis commands/s", "redis_ops_per_s", ""),
    ("events written / lost / duplicated", lambda p: f"{p['events_written']} / {p['events_lost']} / "
                                                     f"{p['events_duplicated']}", "0 lost, 0 dup"),
    ("workers killed / their jobs requeued exactly once", lambda p: f"{p['killed']} / {p['killed_requeued_once']}",
     "all"),
    ("live jobs that lost their lease (late heartbeats)", "lost_lease", "0"),
    ("jobs finished: succeeded / cancelled", lambda p: f"{p['finished']['succeeded']} / {p['finished']['cancelled']}", ""),
    ("worker / client errors", lambda p: f"{p['worker_errors']} / {p['client_errors']}", ""),
]


def table(points: list[dict]) -> str:
    lines = ["| measure | " + " | ".join(f"N={p['workers']} ×{p['scale']:g}" for p in points) + " | target |",
             "|---" * (len(points) + 2) + "|"]
    for label, key, target in ROWS[1:]:
        cells = [key(p) if callable(key) else p.get(key) for p in points]
        lines.append(f"| {label} | " + " | ".join("–" if c is None else str(c) for c in cells) + f" | {target} |")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    """Four panels over the sweep's points, one line per run (before / after the fixes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [("API p99 (ms)", [("get_p99_ms", "GET job"), ("list_p99_ms", "owner list"),
                                ("submit_p99_ms", "submit")], 50),
              ("event lag p99, emitted → SSE (ms)", [("lag_sse_p99_ms", "emitted"),
                                                     ("lag_sse_written_p99_ms", "written")], 2000),
              ("worker claim p99 / reaper pass max (ms)", [("claim_p99_ms", "claim"), ("reaper_max_ms", "reaper")], None),
              ("PostgreSQL per second", [("pg_xacts_per_s", "transactions"), ("pg_inserts_per_s", "rows inserted")],
               None)]
    styles = {0: "-o", 1: "--s"}
    for ax, (title, series, target) in zip(axes.flat, panels):
        for r, (name, points) in enumerate(runs.items()):
            labels = [f"{p['workers']}×{p['scale']:g}" for p in points]
            for key, what in series:
                ax.plot(labels, [p.get(key) if p.get(key) is not None else float("nan") for p in points],
                        styles[r % 2], label=f"{what} ({name})")
        if target:
            ax.axhline(target, color="red", lw=0.8, ls=":", label=f"target {target}")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("simulated workers × time-scale")
        ax.legend(fontsize=7)
    fig.suptitle("bench/scale.py: 100,000 jobs in the database, 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(after: Path, before: Path | None) -> None:
    """bench/results/scale.md's generated tables and scale.png from the sweep's JSON (and a baseline's)."""
    runs = {"after": json.loads(after.read_text())}
    if before is not None:
        runs = {"before": json.loads(before.read_text()), **runs}
    out = after.with_suffix("")
    plot({k: v["points"] for k, v in runs.items()}, out.with_suffix(".png"))
    parts = []
    for name, run in runs.items():
        parts.append(f"### {name}\n\nList with no workers running, as jobs were added (p99 ms, 60 sequential requests):\n")
        parts.append("| jobs | db MB | owner list | owner list, running | dashboard (admin, 50) | dashboard, failed |\n"
                     "|---|---|---|---|---|---|")
        for p in run["list_scan"]:
            parts.append(f"| {p['jobs']:,} | {p['db_mb']} | {p['list_p99_ms']} | {p['list_running_p99_ms']} | "
                         f"{p['dashboard_p99_ms']} | {p['dashboard_failed_p99_ms']} |")
        parts.append("\nWith workers (100,000 jobs seeded):\n")
        parts.append(table(run["points"]))
        parts.append("")
    out.with_suffix(".tables.md").write_text("\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-child", help=argparse.SUPPRESS)
    parser.add_argument("--report", nargs="+", metavar="JSON", help="only write the tables and plot: AFTER [BEFORE]")
    parser.add_argument("--points", default="10:1,100:1,300:1,300:3,1000:10",
                        help="simulated workers:time-scale, comma-separated (see the module docstring)")
    parser.add_argument("--seed-jobs", type=int, default=100_000, help="finished jobs in the database")
    parser.add_argument("--seed-steps", default="1000,10000", help="list-only measurements at these job counts first")
    parser.add_argument("--seed-events", type=int, default=20, help="events per seeded job")
    parser.add_argument("--api-procs", type=int, default=2)
    parser.add_argument("--sim-procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=40, help="steady state per point")
    parser.add_argument("--step-rate", type=float, default=3.0, help="steps/s of one job (ResNet-50, one GPU)")
    parser.add_argument("--event-every", type=int, default=20, help="RIGL_EVENT_EVERY_STEPS")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--mask-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=200, help="RIGL_CHECKPOINT_EVERY_STEPS")
    parser.add_argument("--checkpoint-min-seconds", type=float, default=30)
    parser.add_argument("--job-seconds-min", type=float, default=30)
    parser.add_argument("--job-seconds-max", type=float, default=240)
    parser.add_argument("--arrival-rate", type=float, default=5.0, help="job submissions per second")
    parser.add_argument("--cancel-share", type=float, default=0.05)
    parser.add_argument("--kill-share", type=float, default=0.05, help="share of runs whose worker dies")
    parser.add_argument("--lease", type=float, default=6.0, help="RIGL_LEASE_SECONDS (× scale)")
    parser.add_argument("--reaper-interval", type=float, default=2.0)
    parser.add_argument("--sse-streams", type=int, default=20)
    parser.add_argument("--api-pool", default="8:4", help="RIGL_DB_POOL_SIZE:RIGL_DB_MAX_OVERFLOW per API process")
    parser.add_argument("--sim-pool", default="25:5", help="the same per simulated-worker process")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = parser.parse_args()
    if args.sim_child:
        return sim_main(args.sim_child)
    if args.report:
        return report(Path(args.report[0]), Path(args.report[1]) if len(args.report) > 1 else None)

    import psycopg
    import redis

    from helpers.service import (PG_ADMIN, REDIS, cleanup_redis_queue, free_port, stop_group,
                                 temporary_postgres_database, wait_ready)
    from store.jobs import JobStore
    from store.keys import create_key

    pool_size, overflow = args.api_pool.split(":")
    queue = f"rigl-scale-{os.getpid()}"
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("sim_child", "out")},
               "machine": f"{os.cpu_count()} cores, {os.uname().machine}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "list_scan": [], "points": []}
    broker = redis.Redis.from_url(REDIS)
    with temporary_postgres_database() as database_url, tempfile.TemporaryDirectory(prefix="rigl-scale-") as tmp:
        tmp = Path(tmp)
        dbname = database_url.rsplit("/", 1)[1]
        pg_url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{dbname}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
        env.update(RIGL_DATA_DIR=str(tmp / "data"), RIGL_DATABASE_URL=database_url, RIGL_BROKER_URL=REDIS,
                   RIGL_QUEUE=queue, RIGL_AUTH="true", RIGL_MAX_ACTIVE_JOBS_PER_OWNER="100000",
                   RIGL_EVENT_EVERY_STEPS=str(args.event_every), RIGL_CHECKPOINT_EVERY_STEPS=str(args.checkpoint_every),
                   RIGL_DB_POOL_SIZE=pool_size, RIGL_DB_MAX_OVERFLOW=overflow, RIGL_MAX_STREAMS_PER_OWNER="500",
                   PYTHONPATH=str(ROOT))
        store = JobStore(database_url)  # makes the schema
        keys = {f"owner{i}": create_key(store, f"owner{i}", "scale bench")[1] for i in range(OWNERS)}
        admin = create_key(store, "admin", "scale bench", admin=True)[1]
        store.engine.dispose()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api_env = {**env, "RIGL_REAPER": "false"}  # the timed reaper runs in simulated-worker process 0
        log = open(tmp / "api.log", "ab")
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
                                "--port", str(port), "--workers", str(args.api_procs), "--log-level", "warning"],
                               env=api_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(url, 90, api, what="the API processes")
            with psycopg.connect(pg_url, autocommit=True) as pg:
                for target in [int(x) for x in args.seed_steps.split(",") if x] + [args.seed_jobs]:
                    took = seed(pg, target, args.seed_events)
                    size = pg.execute("SELECT pg_database_size(current_database()) / 1e6").fetchone()[0]; size = float(size)
                    point = {"jobs": target, "seed_seconds": round(took, 1), "db_mb": round(size, 1),
                             **list_scan(url, keys, admin)}
                    print(json.dumps(point), flush=True)
                    results["list_scan"].append(point)
            for n, scale in (p.split(":") for p in args.points.split(",")):
                point = run_point(int(n), float(scale), args, env, url, keys, admin, pg_url, dbname, tmp, broker)
                print(json.dumps(point), flush=True)
                results["points"].append(point)
                Path(args.out).write_text(json.dumps(results, indent=1))
        finally:
            stop_group(api, 15, 15)
            log.close()
            cleanup_redis_queue(queue)
            if os.environ.get("SCALE_KEEP_LOGS"):
                subprocess.run(["cp", "-r", str(tmp), os.environ["SCALE_KEEP_LOGS"]])
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
