"""The reaper anywhere (issue 15 item 5): exactly one holder of the reaper's lock per database, taken
over when the holder dies; and a worker's reaper requeueing a dead worker's job with no API running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from helpers.service import (REDIS, ROOT, cleanup_redis_queue, postgres_available, redis_available, start_worker,
                             temporary_postgres_database, wait_for)
from store.leader import LeaderLock

needs_postgres = pytest.mark.skipif(not postgres_available() and not os.environ.get("CI"), reason="needs PostgreSQL")

HOLD = textwrap.dedent("""
    import sys, time
    from store.leader import LeaderLock
    lock = LeaderLock(sys.argv[1], "reaper")
    print("held" if lock.held() else "refused", flush=True)
    time.sleep(120)
""")


def _holder(database_url: str) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, database_url], stdout=subprocess.PIPE, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def _one_holder_then_takeover(database_url: str) -> None:
    first, second = LeaderLock(database_url, "reaper"), LeaderLock(database_url, "reaper")
    assert first.held() and not second.held()
    assert first.held() and not second.held()  # the holder keeps it round after round
    assert LeaderLock(database_url, "janitor").held()  # another role is another lock
    first.release()
    assert second.held() and not first.held()
    second.release()

    other = _holder(database_url)  # a holder in another process, killed without a goodbye
    try:
        assert not first.held()
        other.send_signal(signal.SIGKILL)
        other.wait(10)
        assert wait_for(first.held, 10, interval=0.1, what="the lock freed by the holder's death")
    finally:
        other.kill()
        first.release()


def test_sqlite_one_holder_and_takeover_when_it_dies(tmp_path):
    _one_holder_then_takeover(f"sqlite:///{tmp_path / 'rigl.db'}")


@needs_postgres
def test_postgres_one_holder_and_takeover_when_it_dies():
    with temporary_postgres_database() as database_url:
        _one_holder_then_takeover(database_url)


def test_a_forked_child_neither_holds_nor_releases_its_parents_lock(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'rigl.db'}"
    lock = LeaderLock(database_url, "reaper")
    assert lock.held()
    pid = os.fork()
    if pid == 0:  # the child (a Celery pool process): exits normally, closing what it inherited
        os._exit(0 if lock._file is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child kept a copy of the lock file"
    assert not LeaderLock(database_url, "reaper").held(), "the child's exit released the parent's lock"
    lock.release()


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.serial  # leases of 2-3 seconds: one at a time, beside niced tests only (.ci/run)
@pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                    reason="needs PostgreSQL and Redis")
def test_a_workers_reaper_requeues_a_dead_workers_job_with_no_api_running(tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from store.jobs import JobStore
    from store.settings import Settings

    queue = f"rigl-reap-{uuid.uuid4().hex[:8]}"
    job = {"model": {"name": "mlp", "hidden_sizes": [64, 32]}, "dataset": {"name": "digits"},
           "sparsity": {"method": "rigl", "sparsity": 0.9}, "training": {"epochs": 30, "batch_size": 64}}
    with temporary_postgres_database() as database_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
        env.update({"RIGL_DATA_DIR": str(tmp_path), "RIGL_DATABASE_URL": database_url, "RIGL_BROKER_URL": REDIS,
                    "RIGL_QUEUE": queue, "RIGL_LEASE_SECONDS": "3", "RIGL_REAPER_INTERVAL_SECONDS": "0.5",
                    "RIGL_CHECKPOINT_EVERY_STEPS": "20", "RIGL_CHECKPOINT_MIN_SECONDS": "0",
                    "RIGL_CANCEL_POLL_SECONDS": "0.2"})  # progress reaches the database every 0.2 s
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        workers = [start_worker(env, log) for log in logs]  # one of their reapers holds the lock
        try:
            for log in logs:
                wait_for(lambda: log.is_file() and b" ready." in log.read_bytes(), 90, what=f"{log.stem} ready")
            settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS, queue=queue,
                                auth=False, reaper=False)
            with TestClient(create_app(settings)) as api:  # submit, then the API is gone
                job_id = api.post("/v1/jobs", json=job).json()["id"]
            store = JobStore(database_url)
            running = wait_for(lambda: (lambda j: j if j.status == "running" and j.step >= 5 else None)(
                store.get_job(job_id)), 120, interval=0.05, what="the job running")
            pool = int(running.worker.rsplit(":", 1)[1])
            dead = [w.pid for w in workers].index(_parent(pool))
            for pid in (workers[dead].pid, pool):  # the worker holding the job, without warning
                os.kill(pid, signal.SIGKILL)
            done = wait_for(lambda: (lambda j: j if j.status in ("succeeded", "failed") else None)(
                store.get_job(job_id)), 180, interval=0.3, what="the job finished by the other worker")
            assert done.status == "succeeded", done.error
            assert done.attempt == 2  # the lost run counted, and the surviving worker ran it again
            reaped = [log.read_text().count("lost its worker; requeued") for log in logs]
            assert reaped[dead] == 0 and reaped[1 - dead] == 1, reaped  # the survivor acted, once
        finally:
            for worker in workers:
                worker.kill()
                worker.wait(30)
            cleanup_redis_queue(queue)
