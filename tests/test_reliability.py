"""Crash recovery on real parts: PostgreSQL, Redis and Celery worker processes killed with SIGKILL.

10 identical jobs, 2 workers; a busy worker (main process and its child) is SIGKILLed 3 times and
restarted each time. Every job must succeed exactly once, killed jobs must resume from their last
checkpoint (step > 0), and since all jobs share one spec and seed, every final checkpoint must be
bitwise identical, resumed or not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load

from service_helpers import (JOB, REDIS, ROOT, cleanup_redis_queue, postgres_available, redis_available,
                            temporary_postgres_database, wait_for)
from store.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                       reason="needs PostgreSQL and Redis"),
]

LONG_JOB = {**JOB, "training": {"epochs": 60, "batch_size": 64}}


def start_worker_group(env, log_path):
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--loglevel", "INFO",
                             "--name", f"w{uuid.uuid4().hex[:6]}@%h"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def test_kill_workers_nothing_lost_nothing_twice_resume_exact(tmp_path):
    from fastapi.testclient import TestClient

    from api.app import create_app

    queue = f"rigl-kill-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = {**os.environ, "RIGL_DATA_DIR": str(tmp_path), "RIGL_DATABASE_URL": database_url,
               "RIGL_BROKER_URL": REDIS, "RIGL_QUEUE": queue, "RIGL_LEASE_SECONDS": "3",
               "RIGL_CANCEL_POLL_SECONDS": "0.3", "RIGL_CHECKPOINT_EVERY_STEPS": "25",
               "RIGL_CHECKPOINT_MIN_SECONDS": "0"}
        settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS, queue=queue,
                            lease_seconds=3, reaper_interval_seconds=0.5, auth=False)
        workers = [start_worker_group(env, tmp_path / f"worker{i}.log") for i in range(2)]
        kills = 0
        try:
            with TestClient(create_app(settings)) as api:
                ids = [api.post("/v1/jobs", json=LONG_JOB).json()["id"] for _ in range(10)]
                for kill in range(3):
                    # wait until some job is well into training (a resume checkpoint exists), then kill its worker
                    def busy():
                        jobs = [api.get(f"/v1/jobs/{i}").json() for i in ids]
                        running = [j for j in jobs if j["status"] == "running" and j["progress"]["step"] > 60]
                        return running or None

                    wait_for(busy, 180, interval=0.2, what="a busy job")
                    victim = workers[kill % 2]
                    kill_group(victim)
                    kills += 1
                    workers[kill % 2] = start_worker_group(env, tmp_path / f"worker{kill % 2}.log")
                    time.sleep(1.0)

                def all_done():
                    jobs = [api.get(f"/v1/jobs/{i}").json() for i in ids]
                    return jobs if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs) else None

                finals = wait_for(all_done, 400, interval=1.0, what="all jobs")
                assert [j["status"] for j in finals] == ["succeeded"] * 10, [(j["id"], j["status"], j["error"])
                                                                              for j in finals]
                resumed_steps, duplicated = [], 0
                for job in finals:
                    events = api.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
                    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
                    runs, requeues = statuses.count("running"), statuses.count("requeued")
                    duplicated += runs - requeues - 1  # every extra run must follow a requeue
                    resumed_steps += [e["data"]["resumed_from_step"] for e in events
                                      if e["type"] == "message" and "resumed_from_step" in (e["data"] or {})]
                    assert abs(job["result"]["sparsity"] - 0.9) < 0.002
                    assert job["result"]["steps"] == job["progress"]["total_steps"]
                assert duplicated == 0
                assert len(resumed_steps) >= 3 and all(step > 0 for step in resumed_steps), resumed_steps
                exports = [load(api.get(f"/v1/jobs/{i}/checkpoint?format=dense").content) for i in ids]
                for other in exports[1:]:
                    for name, tensor in exports[0].items():
                        assert torch.equal(tensor, other[name]), name
                print(f"\nreliability: 10 jobs, {kills} workers killed, 10 succeeded, 0 failed, 0 lost, "
                      f"{duplicated} duplicated, resumed from steps {sorted(resumed_steps)}")
        finally:
            for worker in workers:
                kill_group(worker)
            cleanup_redis_queue(queue)
