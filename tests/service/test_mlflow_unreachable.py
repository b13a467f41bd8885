"""MLflow being down never fails a job: a job whose tracking server refuses every connection succeeds,
with one warning event saying MLflow logging stopped (the runner in process, on a real SQLite store)."""

from __future__ import annotations

import pytest

from helpers.service import JOB, free_port

pytest.importorskip("mlflow")


def test_a_job_with_an_unreachable_tracking_server_succeeds_with_a_warning(make_api):
    from worker.runner import run_job

    api = make_api(mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    assert run_job(job_id, api.settings) == "succeeded"
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and "mlflow" not in job["result"]
    events = api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    warnings = [e for e in events if (e["data"] or {}).get("code") == "tracking_unavailable"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warn"
    assert warnings[0]["message"].startswith("MLflow logging stopped: opening the run failed 3 times")


def test_a_job_that_asks_for_mlflow_on_a_service_without_a_server_says_so(make_api):
    from worker.runner import run_job

    api = make_api()
    job_id = api.post("/v1/jobs", json={**JOB, "tracking": {"mlflow": {"experiment": "x"}}}).json()["id"]
    assert run_job(job_id, api.settings) == "succeeded"
    events = api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    assert [e["message"] for e in events if (e["data"] or {}).get("code") == "tracking_unavailable"] == [
        "tracking.mlflow: no tracking URI (neither the job's tracking.mlflow.uri nor the service's "
        "RIGL_MLFLOW_TRACKING_URI); this job is not logged to MLflow"]


def test_the_service_refuses_a_job_tracking_uri_that_is_not_http(api):
    response = api.post("/v1/jobs", json={**JOB, "tracking": {"mlflow": "file:///etc/mlruns"}})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "tracking.mlflow.uri"


def test_register_answers_409_for_a_job_without_a_run_and_404_for_none(make_api):
    from worker.runner import run_job

    api = make_api(mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    queued = api.post(f"/v1/jobs/{job_id}/register", json={"name": "m"})
    assert queued.status_code == 409 and queued.json()["error"]["code"] == "not_finished"
    assert run_job(job_id, api.settings) == "succeeded"  # MLflow down: no run was made
    untracked = api.post(f"/v1/jobs/{job_id}/register", json={"name": "m"})
    assert untracked.status_code == 409 and untracked.json()["error"]["code"] == "not_tracked"
    assert api.post("/v1/jobs/job_0123456789abcdef0123/register", json={"name": "m"}).status_code == 404
    bad = api.post(f"/v1/jobs/{job_id}/register", json={"name": "a/b"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "name"
