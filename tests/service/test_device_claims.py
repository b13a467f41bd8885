"""Workers claim only jobs they own enough devices for (`training.devices`), on SQLite and PostgreSQL.

A slot (Celery message) has its job's device class: it starts only a job needing exactly that many
devices, on a worker owning at least that many; a worker too small for it sends it on, and the jobs
too big for the worker that looked say so (`waiting_for_devices`). The last test runs it
through real worker processes on Redis and PostgreSQL: a 1-device worker passes a 2-device job's slot
to the `.devices-2` queue, where a 2-device worker (2 gloo processes on CPU) picks it up and trains it.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from helpers.service import (JOB, REDIS, cleanup_redis_queue, postgres_available, redis_available, start_worker,
                             stop, temporary_postgres_database, wait_for)
from store.job_state import WAITING_FOR_DEVICES
from store.jobs import JobStore, required_devices
from store.settings import Settings

NEEDS_POSTGRES = pytest.mark.skipif(not postgres_available() and not os.environ.get("CI"),
                                    reason="needs PostgreSQL on 127.0.0.1:5432")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=NEEDS_POSTGRES)])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield JobStore(f"sqlite:///{tmp_path / 'rigl.db'}")
        return
    with temporary_postgres_database() as url:
        store = JobStore(url)
        yield store
        store.engine.dispose()


def job(devices, **training) -> dict:
    return {**JOB, "training": {**JOB["training"], "devices": devices, **training}}


def submit(store: JobStore, devices, owner: str = "local") -> str:
    spec = job(devices)
    return store.create_job(spec, spec, total_steps=46, owner=owner).id


def test_required_devices_reads_the_resolved_spec():
    assert [required_devices(job(d)) for d in (1, 2, 8, "all")] == [1, 2, 8, 1]
    assert required_devices(JOB) == 1 and required_devices({}) == 1


def test_a_one_device_worker_skips_a_two_device_job_and_a_two_device_worker_takes_it(store):
    from api.schemas import job_json

    two, one, every = submit(store, 2), submit(store, 1), submit(store, "all")
    nothing, why = store.claims.claim(two, max_attempts=3, devices=1)  # its slot, seen by a 1-device worker
    assert nothing is None and "a slot for 2 devices; this worker has 1" in why
    assert store.get_job(two).status == "queued"
    # ... which sends it on to the 2-device queue; the job says what it waits for (once)
    assert store.claims.forward_class(two, devices=1) == 2 and store.claims.forward_class(two, devices=1) == 2
    waiting = job_json(store.get_job(two))
    assert waiting["devices"] == 2 and waiting["error"]["code"] == WAITING_FOR_DEVICES
    assert "waiting for a worker with 2 devices" in waiting["error"]["message"]
    assert [e.message for e in store.events.list_events(two) if e.type == "message"] == [waiting["error"]["message"]]
    # the 1-device and the 'all' job start on the 1-device worker
    assert store.claims.claim(one, max_attempts=3, devices=1)[0].id == one
    assert store.claims.claim(every, max_attempts=3, devices=1)[0].id == every
    assert job_json(store.get_job(every))["devices"] == "all"
    taken, _ = store.claims.claim(two, max_attempts=3, devices=2)
    assert taken.id == two and taken.status == "running" and taken.error_code is None
    assert store.claims.forward_class(two, devices=1) is None  # nothing of its class waits: the slot is spent
    big = submit(store, 8)
    assert store.claims.forward_class(big, devices=2) == 8 and store.get_job(big).error_code == WAITING_FOR_DEVICES
    cancelled = store.request_cancel(big)
    assert cancelled.status == "cancelled" and cancelled.error_code is None and cancelled.error_message is None


def test_each_class_keeps_its_slots(store):
    """A slot starts the fairest job of its own class only: a 2-device worker's 1-device slot takes the
    1-device job, not the older 2-device one, and a 1-device job's slot never goes to a 2-device job, so a
    backlog of small jobs can't hold up a big one (nor the reverse)."""
    two, one, later_one = submit(store, 2), submit(store, 1), submit(store, 1)
    assert store.claims.claim(later_one, max_attempts=3, devices=2)[0].id == one  # fairest of class 1: the oldest
    assert store.claims.claim(later_one, max_attempts=3, devices=2)[0].id == later_one
    assert store.claims.claim(one, max_attempts=3, devices=2)[0] is None  # class 1 is empty; the 2-device job waits
    assert store.claims.forward_class(one, devices=2) is None
    assert store.get_job(two).status == "queued" and store.get_job(two).error_code is None  # no note: runnable
    assert store.claims.claim(two, max_attempts=3, devices=2)[0].id == two


def test_fairness_across_owners_still_holds_within_a_class(store):
    """Running jobs of every class count: alice runs a 2-device job, so bob's 1-device job goes first."""
    alice_big = submit(store, 2, owner="alice")
    alice_small = submit(store, 1, owner="alice")
    bob_small = submit(store, 1, owner="bob")
    assert store.claims.claim(alice_big, max_attempts=3, devices=2)[0].id == alice_big
    assert store.claims.claim(alice_small, max_attempts=3, devices=2)[0].id == bob_small
    assert store.claims.claim(bob_small, max_attempts=3, devices=2)[0].id == alice_small


def test_the_run_forwards_a_slot_it_cannot_use(tmp_path, store):
    """worker.runner: a slot too big for this worker → `forward(devices)`, and no job was touched."""
    from worker.runner import run_slot

    settings = Settings(data_dir=tmp_path, worker_devices=1).resolved()
    two = submit(store, 2)
    sent = []
    assert run_slot(two, settings, store, forward=sent.append) == ("forwarded", None) and sent == [2]
    assert store.get_job(two).status == "queued" and store.get_job(two).attempt == 0


def test_worker_queues_and_visible_gpus():
    from worker.devices import check_visible_gpus, owned_devices, slot_queue, worker_queues

    assert worker_queues("q", 3) == ["q", "q.devices-2", "q.devices-3"] and slot_queue("q", 1) == "q"
    assert owned_devices(Settings(), gpus=0) == 1 and owned_devices(Settings(), gpus=8) == 8
    assert owned_devices(Settings(worker_devices=2), gpus=0) == 2
    check_visible_gpus(Settings(worker_devices=2), gpus=0)  # a CPU host: gloo processes
    check_visible_gpus(Settings(worker_devices=8), gpus=8)
    for owned, gpus in ((1, 8), (8, 4)):
        with pytest.raises(SystemExit, match=f"RIGL_WORKER_DEVICES={owned} but {gpus} GPUs are visible"):
            check_visible_gpus(Settings(worker_devices=owned), gpus=gpus)


@pytest.mark.slow
@pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                    reason="needs PostgreSQL and Redis")
def test_real_workers_route_a_two_device_job_to_the_two_device_worker(tmp_path):
    import redis

    from api.context import celery_enqueue

    queue = f"rigl-devices-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
        env.update(RIGL_DATA_DIR=str(tmp_path), RIGL_DATABASE_URL=url, RIGL_BROKER_URL=REDIS, RIGL_QUEUE=queue,
                   CUDA_VISIBLE_DEVICES="")
        settings = Settings(data_dir=tmp_path, database_url=url, broker_url=REDIS, queue=queue).resolved()
        store, enqueue = JobStore(url), celery_enqueue(settings)
        small = {"epochs": 1, "batch_size": 64}
        two = store.create_job(job(2, **small), job(2, **small), 23).id
        workers = [start_worker({**env, "RIGL_WORKER_DEVICES": "1"}, tmp_path / "worker1.log")]
        try:
            enqueue(two)  # a class-1 slot, as the API sends every job's
            waiting = wait_for(lambda: (lambda j: j if j.error_code == WAITING_FOR_DEVICES else None)(
                store.get_job(two)), 90, what="the waiting note")
            assert waiting.status == "queued" and "2 devices" in waiting.error_message and waiting.attempt == 0
            # its slot, where big workers look (sent just after the note is written)
            wait_for(lambda: redis.Redis.from_url(REDIS).llen(f"{queue}.devices-2") == 1, 30,
                     what="the slot on the 2-device queue")
            workers.append(start_worker({**env, "RIGL_WORKER_DEVICES": "2"}, tmp_path / "worker2.log"))
            finished = wait_for(lambda: (lambda j: j if j.status in ("succeeded", "failed") else None)(
                store.get_job(two)), 240, what="the 2-device job")
            assert finished.status == "succeeded", finished.error_message
            assert finished.error_code is None and finished.attempt == 1
            assert finished.result["steps"] == 23 and finished.result["leak_check_ok"]
            report = json.loads(next((tmp_path / "artifacts").rglob(f"{two}/report.json")).read_text())
            assert report["devices"] == 2  # trained as two processes
        finally:
            for worker in workers:
                stop(worker)
            cleanup_redis_queue(queue)
