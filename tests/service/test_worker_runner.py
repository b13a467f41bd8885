"""The worker's runner in process, on a real SQLite store: the lease thread, a stop request, and
jobs whose message could not be sent. The Celery and Redis versions are in test_reliability.py."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from helpers.service import JOB, job_history
from store.settings import Settings


@pytest.fixture()
def service(make_api):
    """(API client, resolved settings, list of job ids sent to the stand-in broker)."""
    client = make_api(cancel_poll_seconds=0.2, lease_seconds=1.0)
    return client, client.settings, client.sent


def test_the_heartbeat_thread_keeps_the_lease_while_the_training_loop_is_silent(service):
    from store.jobs import JobStore
    from worker.heartbeat import Heartbeat

    api, settings, _ = service
    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    store = JobStore(settings.database_url)
    _, token = store.claims.claim(job_id, max_attempts=3, lease_seconds=settings.lease_seconds)
    heartbeat = Heartbeat(store, job_id, token, interval=0.2, progress=lambda: (None, None))
    heartbeat.start()
    try:
        time.sleep(2.5 * settings.lease_seconds)  # no training step at all, as in a slow start
        assert store.leases.requeue_stale(settings.lease_seconds) == []
        assert not heartbeat.lost_lease
    finally:
        heartbeat.stop()
    assert not heartbeat.is_alive()
    time.sleep(1.5 * settings.lease_seconds)  # the control: without the thread the lease lapses
    assert store.leases.requeue_stale(settings.lease_seconds) == [job_id]
    heartbeat.beat_now()
    assert heartbeat.lost_lease  # and a late beat learns it is no longer the holder


def test_a_stop_request_checkpoints_requeues_and_the_next_run_resumes(service):
    from worker.runner import run_job

    api, settings, _ = service
    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    stop = threading.Event()
    stop.set()  # as the SIGTERM handler does: the job stops after its first step
    assert run_job(job_id, settings, stop_requested=stop) == "requeued"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "requeued" and job["progress"]["step"] == 1 and job["error"] is None
    assert [c["kind"] for c in api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]] == ["resume"]

    assert run_job(job_id, settings) == "succeeded"
    statuses, resumed, events = job_history(api, job_id)
    assert statuses == ["queued", "running", "requeued", "running", "succeeded"]
    assert any("SIGTERM" in e["message"] for e in events if e["type"] == "status")
    assert resumed == [1]


def test_a_job_whose_message_could_not_be_sent_waits_visibly_and_the_reaper_sends_it(tmp_path):
    from api.app import create_app
    from store.reaper import Reaper

    broker: dict = {"up": False, "sent": []}

    def enqueue(job_id: str) -> None:
        if not broker["up"]:
            raise ConnectionRefusedError("broker down")
        broker["sent"].append(job_id)

    settings = Settings(data_dir=tmp_path)
    with TestClient(create_app(settings, enqueue=enqueue, reaper=False)) as api:
        created = [api.post("/v1/jobs", json=JOB) for _ in range(2)]
        assert [r.status_code for r in created] == [201, 201]  # accepted and stored: nothing is lost
        ids = [r.json()["id"] for r in created]
        for response in created:
            job = response.json()
            assert job["status"] == "queued" and job["error"]["code"] == "broker_unavailable"
            assert "broker" in job["error"]["message"]
        store = api.app.state.context.store
        reaper = Reaper(store, enqueue, lease_seconds=60, interval=1)
        reaper.run_once()
        assert broker["sent"] == []  # still down: still waiting, still marked
        assert api.get(f"/v1/jobs/{ids[0]}").json()["error"]["code"] == "broker_unavailable"
        broker["up"] = True
        reaper.run_once()
        assert broker["sent"] == ids  # oldest first, once each
        reaper.run_once()
        assert broker["sent"] == ids
        assert all(api.get(f"/v1/jobs/{i}").json()["error"] is None for i in ids)
