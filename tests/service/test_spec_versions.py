"""Rolling upgrades: every stored job spec carries `spec_version` (store/spec_version.py); a worker that
finds a newer version than it reads hands the job back without spending an attempt and re-sends its message
after `spec_defer_seconds`, instead of failing a job a newer worker could run."""

from __future__ import annotations

import json

import pytest

from helpers.service import JOB
from store.spec_version import KEY, SPEC_VERSION, version_of

SMALL = {"model": {"name": "mlp", "hidden_sizes": [16]}, "dataset": {"name": "digits"},
         "sparsity": {"method": "rigl", "sparsity": 0.9}, "training": {"epochs": 1, "batch_size": 64}}


@pytest.fixture()
def store(tmp_path):
    from store.jobs import JobStore

    return JobStore(f"sqlite:///{tmp_path / 'rigl.db'}")


def test_submitted_jobs_store_their_spec_version_and_the_api_still_reads_them(make_api):
    api = make_api()
    job = api.post("/v1/jobs", json=JOB).json()
    stored = api.store.get_job(job["id"])
    assert stored.resolved_spec[KEY] == SPEC_VERSION
    assert KEY not in job["spec"]  # the user's spec is shown as submitted
    assert api.get(f"/v1/jobs/{job['id']}/sparsity").status_code == 200  # parses the stored spec
    assert version_of({"model": {}}) == 1  # written before versions


def test_a_newer_spec_is_left_queued_without_spending_attempts(settings, store, tmp_path):
    from worker.runner import run_job

    newer = {**SMALL, "training": {**SMALL["training"], "a_field_from_the_future": True}}
    job_id = store.create_job(newer, newer, total_steps=29).id
    with store.engine.begin() as connection:  # as a newer release stored it
        from sqlalchemy import text

        connection.execute(text("UPDATE jobs SET resolved_spec = :spec WHERE id = :id"),
                           {"spec": json.dumps({**newer, KEY: SPEC_VERSION + 1}), "id": job_id})
    for _ in range(settings.max_attempts + 2):  # more hand-backs than max_attempts: none of them counts
        assert run_job(job_id, settings, store) == "deferred"
    job = store.get_job(job_id)
    assert job.status == "requeued" and job.error_code is None
    assert job.attempt - job.preemptions == 0  # no failed attempt
    messages = [e.message for e in store.events.list_events(job_id, limit=1000) if e.type == "status"]
    assert any(f"spec is version {SPEC_VERSION + 1}, this worker reads up to {SPEC_VERSION}" in m for m in messages)

    from store.jobs import JobStore

    current = JobStore(f"sqlite:///{tmp_path / 'control.db'}")  # the same spec at this release's version
    control = current.create_job(newer, newer, total_steps=29).id
    assert run_job(control, settings, current) == "failed"  # is a bad spec, and fails as before
    assert current.get_job(control).error_code == "invalid_job"


def test_a_deferred_job_is_sent_again_after_the_backoff(settings, store):
    """The message goes through the real (filesystem) broker with an ETA `spec_defer_seconds` ahead;
    a preempted job's goes at once."""
    import base64

    from service_common.celery_app import make_celery
    from worker.tasks import send_on

    app = make_celery(settings)
    job_id = store.create_job(SMALL, SMALL, total_steps=29).id
    send_on(app, store, settings.model_copy(update={"spec_defer_seconds": 45}), job_id, "deferred")
    send_on(app, store, settings, job_id, "requeued")
    sent = [json.loads(path.read_text()) for path in sorted(settings.broker_folder.glob("*.msg"))]
    headers = [message["headers"] for message in sent]
    assert [h["args"] if "args" in h else json.loads(base64.b64decode(m["body"]))[0] for h, m in zip(headers, sent)]
    etas = sorted((h.get("eta") is not None) for h in headers)
    assert etas == [False, True], headers
