"""`training.nodes`: what the API accepts and refuses, what a worker claims, and the Ray module kept optional.

The gang itself runs on a real Ray cluster in tests/service/test_ray_gang.py (slow); these are the fast checks
of the rules around it."""

from __future__ import annotations

import sys

import pytest

from helpers.service import JOB
from store.jobs import JobStore, required_devices

MULTI = {**JOB, "training": {**JOB["training"], "nodes": 2, "devices": 1, "device": "cpu"}}


def _error(response) -> dict:
    assert response.status_code == 422, (response.status_code, response.text)
    return response.json()["error"]


def test_a_multi_node_job_without_a_ray_cluster_is_refused_naming_what_to_configure(api):
    error = _error(api.post("/v1/jobs", json=MULTI))
    assert error["field"] == "training.nodes" and "RIGL_RAY_ADDRESS" in error["message"]
    assert api.sent == [] and api.get("/v1/jobs").json()["data"] == []


def test_a_multi_node_job_needs_a_bucket_too(make_api):
    api = make_api(ray_address="127.0.0.1:6379")
    error = _error(api.post("/v1/jobs", json=MULTI))
    assert error["field"] == "training.nodes" and "RIGL_ARTIFACT_URL" in error["message"]
    assert "RIGL_RAY_ADDRESS" not in error["message"]


def test_sweeps_of_multi_node_jobs_are_refused_alike(api):
    response = api.post("/v1/sweeps", json={"base": MULTI, "grid": {"sparsity": [0.8, 0.9]}})
    error = _error(response)
    assert "training.nodes" in error["message"] and "RIGL_RAY_ADDRESS" in error["message"], error


def test_a_one_node_job_runs_as_before(api):
    response = api.post("/v1/jobs", json={**JOB, "training": {**JOB["training"], "nodes": 1}})
    assert response.status_code == 201, response.text
    assert response.json()["devices"] == 1


def test_nodes_need_a_device_count_and_a_batch_that_splits_over_every_rank(make_api):
    api = make_api(ray_address="127.0.0.1:6379")
    all_devices = {**MULTI, "training": {**MULTI["training"], "devices": "all"}}
    assert _error(api.post("/v1/jobs", json=all_devices))["field"] == "training.devices"
    uneven = {**MULTI, "training": {**MULTI["training"], "nodes": 3, "batch_size": 64}}
    error = _error(api.post("/v1/jobs", json=uneven))
    assert error["field"] == "training.batch_size" and "nodes × devices" in error["message"]
    too_many = {**MULTI, "training": {**MULTI["training"], "nodes": 65}}
    assert _error(api.post("/v1/jobs", json=too_many))["field"] == "training.nodes"


def test_any_worker_supervises_a_multi_node_job():
    """The gang's GPUs are on the Ray cluster: the supervising worker needs none of its own."""
    assert required_devices({"training": {"nodes": 4, "devices": 8}}) == 1
    assert required_devices({"training": {"nodes": 1, "devices": 8}}) == 8
    assert required_devices({"training": {"devices": 2}}) == 2


def test_the_trainer_refuses_nodes_outside_the_service():
    from helpers.specs import small_spec
    from rigl_core.training.trainer import Trainer

    with pytest.raises(ValueError, match="training.nodes"):
        Trainer(small_spec(training__nodes=2, training__device="cpu"))


def test_planned_steps_count_every_rank():
    from helpers.specs import small_spec
    from rigl_core.data.epochs import planned_world_size

    assert planned_world_size(small_spec(training__nodes=2, training__devices=2).training) == 4
    assert planned_world_size(small_spec(training__nodes=1, training__devices="all").training) == 1


def test_a_gang_that_cannot_be_placed_goes_back_to_the_queue_untouched(settings):
    """Leases.give_back: queued again, the attempt not counted, no lease, the reason shown."""
    store = JobStore(settings.database_url, settings)
    job = store.create_job(JOB, JOB, total_steps=10)
    taken, token = store.claims.claim(job.id, max_attempts=3)
    assert taken.attempt == 1
    assert store.leases.give_back(job.id, token, "waiting_for_nodes", "queued; waiting for the Ray cluster")
    again = store.get_job(job.id)
    assert (again.status, again.attempt, again.lease_token, again.started_at) == ("queued", 0, None, None)
    assert again.error_code == "waiting_for_nodes"
    assert not store.leases.give_back(job.id, token, "waiting_for_nodes", "twice")  # no longer its lease
    retaken, _ = store.claims.claim(job.id, max_attempts=3)
    assert retaken.id == job.id and retaken.attempt == 1 and retaken.error_code is None


def test_a_worker_without_the_ray_extra_fails_the_job_naming_it(settings, monkeypatch):
    from store.artifacts import Artifacts
    from worker.runner import JobRun

    for loaded in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, "ray", None)
    store = JobStore(settings.database_url, settings)
    job = store.create_job(MULTI, MULTI, total_steps=10)
    taken, token = store.claims.claim(job.id, max_attempts=3)
    run = JobRun(taken, token, settings, store, Artifacts.from_settings(settings), None, 0.0)
    assert run.run() == ("failed", job.id)
    failed = store.get_job(job.id)
    assert failed.error_code == "missing_extra"
    assert "needs the 'ray' extra" in failed.error_message and 'rigl-service[ray]' in failed.error_message
    assert "training.nodes" in failed.error_message
