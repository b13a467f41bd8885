"""A worker's lease on real parts: PostgreSQL, Redis, Celery worker processes and the API's reaper.

- a rolling deploy (three warm shutdowns of the worker running one job) resumes it three times and
  does not spend its attempts (max_attempts=3);
- the database unreachable for 20 s from the worker (a TCP proxy in this test, stopped, not the
  shared server) mid-job: the job carries on and succeeds exactly once, no event lost;
- workers whose clocks are 300 s behind and 300 s ahead (a sitecustomize shim shifts time.time and
  datetime.now in their processes): their jobs are not reaped, all succeed on the first attempt;
- owner A holds 20 queued jobs, owner B submits one: B's starts before A's remaining ones.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers.service import (REDIS, ROOT, cleanup_redis_queue, job_history, postgres_available, redis_available,
                             temporary_postgres_database, wait_for)
from store.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.serial,  # leases of a few seconds: one at a time, beside niced tests only (.ci/run)
    pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                       reason="needs PostgreSQL and Redis"),
]

SMALL = {"model": {"name": "mlp", "hidden_sizes": [64, 32]}, "dataset": {"name": "digits"},
         "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "schedule": {"delta_t": 5}},
         "training": {"epochs": 2, "batch_size": 64, "log_every_steps": 5}}  # 23 steps per epoch


def small(epochs: int) -> dict:
    return {**SMALL, "training": {**SMALL["training"], "epochs": epochs}}


def spawn_worker(env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--loglevel", "INFO",
                             "--name", f"w{uuid.uuid4().hex[:6]}@%h"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def ready(log_path: Path) -> bool:
    return log_path.is_file() and b" ready." in log_path.read_bytes()


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def worker_env(tmp_path, database_url, queue, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    env.update({"RIGL_DATA_DIR": str(tmp_path), "RIGL_DATABASE_URL": database_url, "RIGL_BROKER_URL": REDIS,
                "RIGL_QUEUE": queue, "RIGL_LEASE_SECONDS": "3", "RIGL_CANCEL_POLL_SECONDS": "0.3",
                "RIGL_CHECKPOINT_EVERY_STEPS": "10", "RIGL_CHECKPOINT_MIN_SECONDS": "0"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def api_client(tmp_path, database_url, queue, **extra):
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS, queue=queue,
                        lease_seconds=extra.pop("lease_seconds", 3), reaper_interval_seconds=0.5,
                        auth=extra.pop("auth", False), **extra)
    return TestClient(create_app(settings))


def final_status(api, job_id: str, timeout: float, headers=None) -> dict:
    return wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "cancelled") else None)(
        api.get(f"/v1/jobs/{job_id}", headers=headers).json()), timeout, interval=0.3, what=job_id)


def test_a_rolling_deploy_resumes_the_job_and_spends_no_attempts(tmp_path):
    from store.jobs import JobStore

    queue = f"rigl-roll-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = worker_env(tmp_path, database_url, queue, RIGL_MAX_ATTEMPTS=3, RIGL_CANCEL_POLL_SECONDS=0.1)
        logs = iter(tmp_path / f"w{i}.log" for i in range(10))
        workers = [spawn_worker(env, next(logs)) for _ in range(2)]  # two replicas, replaced one at a time
        store = JobStore(database_url)
        try:
            with api_client(tmp_path, database_url, queue, max_attempts=3) as api:
                # 690 steps: each round (resume, 5 steps, SIGTERM noticed) leaves plenty for the next
                job_id = api.post("/v1/jobs", json=small(30)).json()["id"]
                stopped_at = 0
                for rolled in range(3):
                    job = wait_for(lambda: (lambda j: j if j.status == "running" and j.attempt == rolled + 1
                                            and j.step >= stopped_at + 5 else None)(store.get_job(job_id)),
                                   120, interval=0.05, what=f"attempt {rolled + 1} training")
                    holder = parent_pid(int(job.worker.rsplit(":", 1)[1]))
                    index = [w.pid for w in workers].index(holder)
                    workers[index].send_signal(signal.SIGTERM)  # warm shutdown, as a deploy does
                    workers[index].wait(timeout=60)
                    stopped_at = store.get_job(job_id).step
                    workers[index] = spawn_worker(env, next(logs))
                final = final_status(api, job_id, 180)
                assert final["status"] == "succeeded", final
                statuses, resumed, _ = job_history(api, job_id)
                assert statuses == ["queued", *["running", "requeued"] * 3, "running", "succeeded"], statuses
                assert len(resumed) == 3 and resumed == sorted(resumed) and resumed[0] > 0, resumed
                assert final["attempt"] == 4 and store.get_job(job_id).preemptions == 3
                print(f"\nreliability: rolling deploy: 1 job, 3 warm shutdowns (SIGTERM) of the worker running it, "
                      f"requeued 3 times, resumed from steps {resumed}, succeeded on run 4 with max_attempts=3 "
                      f"(0 failed attempts)")
        finally:
            for worker in workers:
                kill_group(worker)
            cleanup_redis_queue(queue)


class TcpProxy:
    """127.0.0.1:<port> → upstream; `down()` closes the port and every connection (the database is
    gone for whoever connects through it), `up()` opens it again."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
            except OSError:
                pass
            listener.close()
        with self.lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_the_database_unreachable_for_20_s_mid_job_is_waited_out(tmp_path):
    from sqlalchemy.engine import make_url

    queue = f"rigl-dbdown-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        url = make_url(database_url)
        proxy = TcpProxy((url.host, url.port or 5432))
        proxy.up()
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        # a lease longer than the outage: the job is not reaped, it must carry on
        env = worker_env(tmp_path, proxied, queue, RIGL_LEASE_SECONDS=40, RIGL_DB_RETRY_SECONDS=120)
        worker = spawn_worker(env, tmp_path / "w.log")
        try:
            with api_client(tmp_path, database_url, queue, lease_seconds=40) as api:
                epochs = 16
                job_id = api.post("/v1/jobs", json=small(epochs)).json()["id"]  # 368 steps
                cut_at = wait_for(lambda: (lambda s: s if s > 30 else None)(
                    api.get(f"/v1/jobs/{job_id}").json()["progress"]["step"]), 120, interval=0.1, what="training")
                proxy.down()
                began = time.monotonic()
                time.sleep(20)
                during = api.get(f"/v1/jobs/{job_id}").json()
                assert during["status"] == "running" and during["progress"]["step"] <= cut_at + 5, during
                proxy.up()
                outage = time.monotonic() - began
                final = final_status(api, job_id, 180)
                assert final["status"] == "succeeded", final
                statuses, _, events = job_history(api, job_id)
                assert statuses == ["queued", "running", "succeeded"], statuses  # no requeue, no second run
                assert final["attempt"] == 1 and worker.poll() is None
                evals = [e["data"]["epoch"] for e in events if e["type"] == "eval"]
                assert evals == list(range(1, epochs + 1)), evals  # the events of the outage were kept
                print(f"\nreliability: database down: PostgreSQL unreachable from the worker for {outage:.0f} s "
                      f"from step {cut_at} of {final['progress']['total_steps']}; the job "
                      f"carried on, succeeded exactly once on attempt 1, {len(evals)}/{epochs} eval events kept")
        finally:
            kill_group(worker)
            proxy.down()
            cleanup_redis_queue(queue)


SKEW_SHIM = '''
"""Test-only: shift this process's wall clock by RIGL_TEST_CLOCK_OFFSET seconds."""
import datetime as _datetime
import os as _os
import time as _time

_offset = float(_os.environ.get("RIGL_TEST_CLOCK_OFFSET", "0"))
if _offset:
    try:  # pandas' C code (sklearn imports it when installed) segfaults on the subclass below: load it first
        import pandas  # noqa: F401
    except ImportError:
        pass
    _real_time, _real_time_ns, _Real = _time.time, _time.time_ns, _datetime.datetime
    _time.time = lambda: _real_time() + _offset
    _time.time_ns = lambda: _real_time_ns() + int(_offset * 1e9)

    class _Meta(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, _Real)

        def __subclasscheck__(cls, sub):
            return issubclass(sub, _Real)

    class _Shifted(_Real, metaclass=_Meta):
        @classmethod
        def now(cls, tz=None):
            return _Real.fromtimestamp(_time.time(), tz)

        @classmethod
        def utcnow(cls):
            return _Real.now(_datetime.timezone.utc).replace(tzinfo=None) + _datetime.timedelta(seconds=_offset)

    _datetime.datetime = _Shifted
'''


def test_workers_with_skewed_clocks_are_not_reaped(tmp_path):
    from store.jobs import JobStore

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SKEW_SHIM)
    check = subprocess.run([sys.executable, "-c", "import datetime, time; print(time.time() - "
                            "datetime.datetime.now(datetime.timezone.utc).timestamp(), time.time())"],
                           env={**os.environ, "PYTHONPATH": str(shim), "RIGL_TEST_CLOCK_OFFSET": "-300"},
                           capture_output=True, text=True, check=True)
    assert abs(float(check.stdout.split()[0])) < 1 and float(check.stdout.split()[1]) < time.time() - 299
    queue = f"rigl-skew-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        base = worker_env(tmp_path, database_url, queue)
        path = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
        logs = {offset: tmp_path / f"w{offset}.log" for offset in (-300, 300)}
        workers = {offset: spawn_worker({**base, "PYTHONPATH": path, "RIGL_TEST_CLOCK_OFFSET": str(offset)},
                                        logs[offset]) for offset in (-300, 300)}
        store = JobStore(database_url)
        try:
            wait_for(lambda: all(ready(log) for log in logs.values()), 90, what="both workers")
            with api_client(tmp_path, database_url, queue) as api:
                ids = [api.post("/v1/jobs", json=small(5)).json()["id"] for _ in range(4)]  # 115 steps, > lease
                ran_on: set[int | None] = set()

                def all_done():
                    jobs = [store.get_job(i) for i in ids]
                    ran_on.update(parent_pid(int(j.worker.rsplit(":", 1)[1])) for j in jobs if j.status == "running")
                    return all(j.status in ("succeeded", "failed", "cancelled") for j in jobs)

                wait_for(all_done, 180, interval=0.1, what="all jobs")
                finals = [api.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
                assert [f["status"] for f in finals] == ["succeeded"] * 4, finals
                for job_id in ids:
                    statuses, _, _ = job_history(api, job_id)
                    assert statuses == ["queued", "running", "succeeded"], (job_id, statuses)
                by_offset = {offset for offset, w in workers.items() if w.pid in ran_on}
                assert by_offset == {-300, 300}, ran_on  # both skewed workers ran jobs
                print("\nreliability: clock skew: 2 workers, clocks 300 s behind and 300 s ahead, lease 3 s: "
                      "4 jobs, 4 succeeded on attempt 1, 0 reaped")
        finally:
            for worker in workers.values():
                kill_group(worker)
            cleanup_redis_queue(queue)


def test_the_next_job_to_start_is_fair_across_owners(tmp_path):
    from store.jobs import JobStore
    from store.keys import create_key

    queue = f"rigl-fair-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        store = JobStore(database_url)
        keys = {owner: {"Authorization": f"Bearer {create_key(store, owner)[1]}"} for owner in ("alice", "bob")}
        worker = spawn_worker(worker_env(tmp_path, database_url, queue), tmp_path / "w.log")
        try:
            wait_for(lambda: ready(tmp_path / "w.log"), 90, what="the worker")
            with api_client(tmp_path, database_url, queue, auth=True, max_active_jobs_per_owner=20) as api:
                a_ids = [api.post("/v1/jobs", json=small(1), headers=keys["alice"]).json()["id"] for _ in range(20)]
                b_response = api.post("/v1/jobs", json=small(1), headers=keys["bob"])
                assert b_response.status_code == 201, b_response.text
                b_id = b_response.json()["id"]
                started_before = sum(store.get_job(i).started_at is not None for i in a_ids)
                b_started = wait_for(lambda: store.get_job(b_id).started_at, 120, what="bob's job")
                a_first = [i for i in a_ids if (store.get_job(i).started_at or b_started) < b_started]
                assert len(a_first) <= max(started_before, 1), (len(a_first), started_before)
                print(f"\nreliability: fairness: owner A queued 20 jobs, then owner B 1: B's job was the "
                      f"{len(a_first) + 1}{'st' if len(a_first) == 0 else 'nd' if len(a_first) == 1 else 'th'} "
                      f"to start (A had {started_before} started when B submitted; FIFO would make it 21st)")
                for job_id in a_ids:  # don't train the rest
                    api.post(f"/v1/jobs/{job_id}/cancel", headers=keys["alice"])
        finally:
            kill_group(worker)
            cleanup_redis_queue(queue)
