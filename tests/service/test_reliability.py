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
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from helpers.service import (JOB, REDIS, ROOT, cleanup_redis_queue, job_history, postgres_available,
                             redis_available, temporary_postgres_database, wait_for)
from store.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.serial,  # leases of a few seconds: one at a time, beside niced tests only (.ci/run)
    pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                       reason="needs PostgreSQL and Redis"),
]

LONG_JOB = {**JOB, "training": {"epochs": 60, "batch_size": 64}}


def start_worker_group(env, log_path):
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--loglevel", "INFO",
                             "--name", f"w{uuid.uuid4().hex[:6]}@%h"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def _parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


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
               "RIGL_CHECKPOINT_MIN_SECONDS": "0", "RIGL_MAX_ATTEMPTS": "5"}
        settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS, queue=queue,
                            lease_seconds=3, reaper_interval_seconds=0.5, auth=False, max_attempts=5)
        workers = [start_worker_group(env, tmp_path / f"worker{i}.log") for i in range(2)]
        kills = 0
        try:
            with TestClient(create_app(settings)) as api:
                ids = [api.post("/v1/jobs", json=LONG_JOB).json()["id"] for _ in range(10)]
                for kill in range(3):
                    # wait until some job is well into training (a resume checkpoint exists), then kill its worker
                    def busy():
                        """(job, index of the worker training it), for a job well into training."""
                        for job_id in ids:
                            job = api.get(f"/v1/jobs/{job_id}").json()
                            if (job["status"] != "running" or job["progress"]["step"] <= 60 or not job["worker"]
                                    or job["attempt"] > 1):  # spread the kills over different jobs
                                continue
                            parent = _parent_pid(int(job["worker"].rsplit(":", 1)[1]))
                            for index, worker in enumerate(workers):
                                if worker.pid == parent:
                                    return index
                        return None

                    index = wait_for(lambda: (lambda i: (i,) if i is not None else None)(busy()), 180, interval=0.2,
                                     what="a busy job")[0]
                    kill_group(workers[index])
                    kills += 1
                    workers[index] = start_worker_group(env, tmp_path / f"worker{index}.log")
                    time.sleep(1.0)

                def all_done():
                    jobs = [api.get(f"/v1/jobs/{i}").json() for i in ids]
                    return jobs if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs) else None

                finals = wait_for(all_done, 400, interval=1.0, what="all jobs")
                assert [j["status"] for j in finals] == ["succeeded"] * 10, [(j["id"], j["status"], j["error"])
                                                                              for j in finals]
                resumed_steps, duplicated = [], 0
                for job in finals:
                    statuses, resumed, _ = job_history(api, job["id"])
                    runs, requeues = statuses.count("running"), statuses.count("requeued")
                    duplicated += runs - requeues - 1  # every extra run must follow a requeue
                    resumed_steps += resumed
                    assert abs(job["result"]["sparsity"] - 0.9) < 0.002
                    assert job["result"]["steps"] == job["progress"]["total_steps"]
                assert duplicated == 0
                assert len(resumed_steps) >= 3 and all(step > 0 for step in resumed_steps), resumed_steps
                exports = [load(api.get(f"/v1/jobs/{i}/checkpoint?format=dense").content) for i in ids]
                for other in exports[1:]:
                    for name, tensor in exports[0].items():
                        assert torch.equal(tensor, other[name]), name
                print(f"\nreliability: kill: 10 jobs, {kills} workers killed, 10 succeeded, 0 failed, 0 lost, "
                      f"{duplicated} duplicated, resumed from steps {sorted(resumed_steps)}")
        finally:
            for worker in workers:
                kill_group(worker)
            cleanup_redis_queue(queue)


def _env(tmp_path, database_url, broker, queue, **extra):
    env = {**os.environ, "RIGL_DATA_DIR": str(tmp_path), "RIGL_DATABASE_URL": database_url,
           "RIGL_BROKER_URL": broker, "RIGL_QUEUE": queue, "RIGL_LEASE_SECONDS": "3",
           "RIGL_CANCEL_POLL_SECONDS": "0.3", "RIGL_CHECKPOINT_EVERY_STEPS": "25", "RIGL_CHECKPOINT_MIN_SECONDS": "0"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _api(tmp_path, database_url, broker, queue):
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=broker, queue=queue,
                        lease_seconds=3, reaper_interval_seconds=0.5, auth=False)
    return TestClient(create_app(settings))


def test_sigterm_checkpoints_requeues_and_the_next_worker_resumes(tmp_path):
    queue = f"rigl-term-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = _env(tmp_path, database_url, REDIS, queue)
        first = start_worker_group(env, tmp_path / "w1.log")
        second = None
        try:
            with _api(tmp_path, database_url, REDIS, queue) as api:
                job = api.post("/v1/jobs", json=LONG_JOB).json()
                wait_for(lambda: api.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] > 60, 120,
                         what="training")
                first.send_signal(signal.SIGTERM)  # warm shutdown of the worker's main process
                first.wait(timeout=60)
                statuses, _, _ = job_history(api, job["id"])
                assert statuses[-1] == "requeued"
                second = start_worker_group(env, tmp_path / "w2.log")
                final = wait_for(lambda: (lambda j: j if j["status"] == "succeeded" else None)(
                    api.get(f"/v1/jobs/{job['id']}").json()), 120, what="resume")
                statuses, resumed, _ = job_history(api, job["id"])
                assert statuses == ["queued", "running", "requeued", "running", "succeeded"]
                assert resumed and resumed[0] > 60
                assert final["attempt"] == 2
                print(f"\nreliability: sigterm: 1 job, 1 worker stopped with SIGTERM, requeued at step >{60}, "
                      f"resumed from step {resumed[0]}, 1 succeeded, 0 lost, 0 duplicated")
        finally:
            for worker in (first, second):
                if worker is not None:
                    kill_group(worker)
            cleanup_redis_queue(queue)


def test_a_preempted_two_device_job_resumes_exactly(tmp_path):
    """`training.devices: 2` (two gloo ranks): SIGTERM to the worker mid-job; rank 0 checkpoints, both ranks
    stop at the same step, the next worker resumes both from that checkpoint, and the final weights are
    bitwise those of an uninterrupted two-rank run."""
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    job_spec = {**JOB, "training": {"epochs": 12, "batch_size": 64, "device": "cpu", "devices": 2}}
    queue = f"rigl-ddp-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = _env(tmp_path, database_url, REDIS, queue, RIGL_WORKER_DEVICES=2)
        first = start_worker_group(env, tmp_path / "w1.log")
        second = None
        try:
            with _api(tmp_path, database_url, REDIS, queue) as api:
                job = api.post("/v1/jobs", json=job_spec).json()
                wait_for(lambda: api.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] > 60, 120,
                         what="training")
                first.send_signal(signal.SIGTERM)
                first.wait(timeout=60)
                second = start_worker_group(env, tmp_path / "w2.log")
                final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
                    api.get(f"/v1/jobs/{job['id']}").json()), 180, what="resume")
                assert final["status"] == "succeeded", final
                statuses, resumed, _ = job_history(api, job["id"])
                assert statuses == ["queued", "running", "requeued", "running", "succeeded"]
                assert resumed and 0 < resumed[0] < final["progress"]["total_steps"]
                assert final["result"]["devices"] == 2
                served = load(api.get(f"/v1/jobs/{job['id']}/checkpoint?format=dense").content)
        finally:
            for worker in (first, second):
                if worker is not None:
                    kill_group(worker)
            cleanup_redis_queue(queue)
    straight = Trainer(JobSpec.model_validate(job_spec))
    straight.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value.contiguous(), served[name]), name
    print(f"\nreliability: 2-device job SIGTERMed, resumed from step {resumed[0]} on both ranks, final weights "
          "bitwise equal to an uninterrupted 2-rank run")


def test_sigterm_to_the_training_process_checkpoints_instead_of_failing(tmp_path):
    """Celery SIGTERMs the pool process running a task when it loses the broker. The job must
    checkpoint and requeue at its next step, never die inside a database call and end `failed`."""
    queue = f"rigl-child-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = _env(tmp_path, database_url, REDIS, queue)
        worker = start_worker_group(env, tmp_path / "w.log")
        try:
            with _api(tmp_path, database_url, REDIS, queue) as api:
                job_id = api.post("/v1/jobs", json=LONG_JOB).json()["id"]
                job = wait_for(lambda: (lambda j: j if j["progress"]["step"] > 60 else None)(
                    api.get(f"/v1/jobs/{job_id}").json()), 120, what="training")
                child = int(job["worker"].rsplit(":", 1)[1])
                assert _parent_pid(child) == worker.pid
                for _ in range(3):  # repeated, as a flurry of signals would land during database calls
                    try:
                        os.kill(child, signal.SIGTERM)
                    except ProcessLookupError:  # it already checkpointed, requeued and exited
                        break
                    time.sleep(0.05)
                final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
                    api.get(f"/v1/jobs/{job_id}").json()), 180, what="the job")
                assert final["status"] == "succeeded", final
                statuses, resumed, events = job_history(api, job_id)
                assert statuses == ["queued", "running", "requeued", "running", "succeeded"]
                assert any("SIGTERM" in e["message"] for e in events if e["type"] == "status")
                assert resumed and resumed[0] > 60
                assert worker.poll() is None  # the worker's main process carried on
                print(f"\nreliability: sigterm-child: 3 SIGTERMs to the training process at step >60, requeued, "
                      f"resumed from step {resumed[0]} by the same worker, 1 succeeded, 0 failed")
        finally:
            kill_group(worker)
            cleanup_redis_queue(queue)


def test_poison_job_fails_after_the_attempt_cap(tmp_path):
    queue = f"rigl-poison-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = _env(tmp_path, database_url, REDIS, queue, RIGL_FAULT_KILL_AT_STEP=5, RIGL_MAX_ATTEMPTS=3)
        worker = start_worker_group(env, tmp_path / "w.log")
        try:
            with _api(tmp_path, database_url, REDIS, queue) as api:
                job = api.post("/v1/jobs", json=LONG_JOB).json()
                final = wait_for(lambda: (lambda j: j if j["status"] in ("failed", "succeeded") else None)(
                    api.get(f"/v1/jobs/{job['id']}").json()), 120, what="the attempt cap")
                assert final["status"] == "failed" and final["error"]["code"] == "too_many_attempts"
                assert final["attempt"] == 3
                statuses, _, _ = job_history(api, job["id"])
                assert statuses.count("running") == 3 and statuses[-1] == "failed"
                assert worker.poll() is None  # the worker survived its children dying
                print("\nreliability: poison: 1 job killing its worker process every attempt, ended failed after "
                      "3 attempts (too_many_attempts), no loop")
        finally:
            kill_group(worker)
            cleanup_redis_queue(queue)


def _start_redis(port, folder):
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes",
                             "--appendfsync", "always", "--save", "", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _redis_up(port):
    import redis

    try:
        return redis.Redis(port=port, socket_timeout=1).ping()
    except Exception:  # noqa: BLE001
        return False


def test_redis_restart_with_queued_and_running_jobs(tmp_path):
    """A private redis-server with appendonly: down when the first job is submitted, restarted once
    with jobs queued (no worker), once mid-training."""
    from helpers.service import free_port

    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    (tmp_path / "redis").mkdir()
    redis_proc = None
    queue = f"rigl-redis-{uuid.uuid4().hex[:8]}"
    worker = None
    with temporary_postgres_database() as database_url:
        env = _env(tmp_path, database_url, broker, queue)
        try:
            with _api(tmp_path, database_url, broker, queue) as api:
                small = {**JOB, "training": {"epochs": 2, "batch_size": 64}}
                early = api.post("/v1/jobs", json=small)  # no broker yet: stored, accepted, marked
                assert early.status_code == 201, early.text
                assert early.json()["error"]["code"] == "broker_unavailable"
                redis_proc = _start_redis(port, tmp_path / "redis")
                wait_for(lambda: _redis_up(port), 20, what="redis")
                wait_for(lambda: api.get(f"/v1/jobs/{early.json()['id']}").json()["error"] is None, 30,
                         what="the reaper sending the early job")
                queued = [early.json()["id"], *[api.post("/v1/jobs", json=small).json()["id"] for _ in range(4)]]
                redis_proc.terminate()
                redis_proc.wait(timeout=20)
                redis_proc = _start_redis(port, tmp_path / "redis")  # AOF replays the queue
                wait_for(lambda: _redis_up(port), 20, what="redis again")
                worker = start_worker_group(env, tmp_path / "w.log")
                for job_id in queued:
                    final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
                        api.get(f"/v1/jobs/{job_id}").json()), 120, what=job_id)
                    assert final["status"] == "succeeded"
                running = api.post("/v1/jobs", json=LONG_JOB).json()["id"]
                wait_for(lambda: api.get(f"/v1/jobs/{running}").json()["progress"]["step"] > 60, 120, what="training")
                redis_proc.kill()
                redis_proc.wait(timeout=20)
                time.sleep(1.0)
                redis_proc = _start_redis(port, tmp_path / "redis")
                wait_for(lambda: _redis_up(port), 20, what="redis restarted")
                final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
                    api.get(f"/v1/jobs/{running}").json()), 240, what="the running job")
                assert final["status"] == "succeeded", final
                for job_id in [*queued, running]:
                    statuses, _, _ = job_history(api, job_id)
                    assert statuses.count("running") == statuses.count("requeued") + 1  # never two at once
                    assert statuses.count("succeeded") == 1
                _, resumed, _ = job_history(api, running)
                assert resumed and resumed[0] > 0, resumed  # Celery cancelled it; it checkpointed, not failed
                print("\nreliability: redis: 1 job submitted with Redis down (201, sent by the reaper later), "
                      f"2 Redis restarts (5 jobs queued, 1 running: resumed from step {resumed[0]}), "
                      "6 submitted, 6 succeeded, 0 lost, 0 duplicated")
        finally:
            if worker is not None:
                kill_group(worker)
            if redis_proc is not None:
                redis_proc.kill()
                redis_proc.wait(timeout=20)
