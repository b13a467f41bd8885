"""The service end to end on real parts: PostgreSQL (jobs), Redis (broker), a real Celery worker process.

The API runs in process (FastAPI's TestClient) against the same database and broker.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch
from safetensors.torch import load_file

from rigl_core.export.packed import load_packed
from rigl_core.models.registry import build_model
from helpers.service import (JOB, REDIS, cleanup_redis_queue, postgres_available, redis_available, start_worker,
                            stop, temporary_postgres_database, wait_for)
from store.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                       reason="needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (.ci/run starts them)"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.app import create_app

    root = tmp_path_factory.mktemp("svc")
    queue = f"rigl-test-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = {**os.environ, "RIGL_DATA_DIR": str(root), "RIGL_DATABASE_URL": database_url,
               "RIGL_BROKER_URL": REDIS, "RIGL_QUEUE": queue, "RIGL_EVENT_EVERY_STEPS": "5",
               "RIGL_CHECKPOINT_EVERY_STEPS": "20", "RIGL_CHECKPOINT_MIN_SECONDS": "0"}
        settings = Settings(data_dir=root, database_url=database_url, broker_url=REDIS, queue=queue, auth=False)
        worker = start_worker(env, root / "worker.log")
        try:
            with TestClient(create_app(settings)) as client:
                client.root = root
                client.worker = worker
                yield client
        finally:
            stop(worker)
            cleanup_redis_queue(queue)
            print((root / "worker.log").read_text()[-3000:])


def wait_done(client, job_id, timeout=180):
    def done():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, what=f"job {job_id} to finish")


def test_submit_run_report_download(service):
    job = service.post("/v1/jobs", json=JOB).json()
    final = wait_done(service, job["id"])
    assert final["status"] == "succeeded", final
    assert final["progress"]["step"] == final["progress"]["total_steps"] == 46
    assert final["result"]["leak_check_ok"] and abs(final["result"]["sparsity"] - 0.9) < 0.002

    events = service.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # monotonic
    types = {e["type"] for e in events}
    assert {"status", "metrics", "eval", "mask_update", "checkpoint"} <= types
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    after = service.get(f"/v1/jobs/{job['id']}/events?after={ids[2]}").json()["data"]
    assert [e["id"] for e in after] == ids[3:]

    assert [e["message"] for e in events if e["type"] == "status"][1] == "running (attempt 1)"

    metrics = service.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert len(metrics["eval"]) == 2 and metrics["train"]
    updates = metrics["mask_updates"]
    assert [u["step"] for u in updates] == [e["data"]["step"] for e in events if e["type"] == "mask_update"]
    explored = [u["exploration"] for u in updates]
    assert explored == sorted(explored) and 0.1 < explored[0] <= explored[-1] <= 1.0  # ever-active only grows
    assert all("layers" not in u and 0 <= u["churn"] <= u["drop_fraction"] + 1e-9 for u in updates)

    report = service.get(f"/v1/jobs/{job['id']}/sparsity").json()
    assert report["final"] and report["leak_check"]["ok"]
    layers = {row["name"]: row for row in report["layers"]}
    assert abs(report["totals"]["exploration"] * report["totals"]["params"]
               - sum(r["exploration"] * r["params"] for r in report["layers"])) < 1

    listed = service.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert {c["kind"] for c in listed} >= {"dense", "packed"}

    dense = service.get(f"/v1/jobs/{job['id']}/checkpoint?format=dense")
    assert dense.status_code == 200
    assert "attachment" in dense.headers["content-disposition"] and job["id"] in dense.headers["content-disposition"]
    import hashlib

    assert hashlib.sha256(dense.content).hexdigest() == dense.headers["x-content-sha256"]
    path = service.root / "dl.safetensors"
    path.write_bytes(dense.content)
    model = build_model("mlp", 10, [1, 8, 8])  # the plain model
    state = load_file(str(path))
    model.load_state_dict(state, strict=True)
    packed = service.get(f"/v1/jobs/{job['id']}/checkpoint?format=packed")
    (service.root / "dl.packed.safetensors").write_bytes(packed.content)
    unpacked = load_packed(service.root / "dl.packed.safetensors")
    masked_total = masked_nnz = 0
    for name, row in layers.items():
        assert torch.equal(unpacked[f"{name}.weight"], state[f"{name}.weight"])
        nonzero = int(torch.count_nonzero(state[f"{name}.weight"]))
        assert nonzero <= row["nnz"]
        masked_total += row["params"]
        masked_nnz += nonzero
    assert abs((1 - masked_nnz / masked_total) - report["totals"]["sparsity"]) < 0.005


def test_sse_stream_and_last_event_id(service):
    job = service.post("/v1/jobs", json=JOB).json()
    seen = []
    with service.stream("GET", f"/v1/jobs/{job['id']}/events/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("id: "):
                seen.append(int(line[4:]))
    assert wait_done(service, job["id"])["status"] == "succeeded"  # the stream ended with the job
    all_ids = [e["id"] for e in service.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]]
    assert seen == all_ids
    resumed = []
    with service.stream("GET", f"/v1/jobs/{job['id']}/events/stream",
                        headers={"Last-Event-ID": str(all_ids[4])}) as response:
        for line in response.iter_lines():
            if line.startswith("id: "):
                resumed.append(int(line[4:]))
    assert resumed == all_ids[5:]


def test_queued_jobs_run_in_order_and_a_bad_one_fails_cleanly(service):
    good = {**JOB, "training": {"epochs": 1, "batch_size": 64}}
    for label in ("a", "b"):  # passes the submit-time checks (files are counted, not decoded); fails to load
        (service.root / "datasets" / "broken" / label).mkdir(parents=True, exist_ok=True)
        (service.root / "datasets" / "broken" / label / "x.png").write_bytes(b"not a png")
    bad = {**good, "dataset": {"name": "imagefolder", "path": "broken"}, "model": {"name": "mlp",
                                                                                   "num_classes": 10}}
    ids = [service.post("/v1/jobs", json=body).json()["id"] for body in (good, bad, good, good)]
    finals = [wait_done(service, job_id) for job_id in ids]
    assert [f["status"] for f in finals] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert finals[1]["error"]["code"] == "invalid_job" and "dataset.path" in finals[1]["error"]["message"]
    assert str(service.root) not in finals[1]["error"]["message"]  # no server path
    started = [f["started_at"] for f in finals]
    assert started == sorted(started)  # one worker: first in, first run
    assert service.worker.poll() is None  # the failure did not take the worker down


def test_cancel_running_job(service):
    long_job = {**JOB, "training": {"epochs": 400, "batch_size": 64}}
    job = service.post("/v1/jobs", json=long_job).json()
    wait_for(lambda: service.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] > 30, 120,
             what="the job to make progress")
    assert service.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
    final = wait_done(service, job["id"], timeout=60)
    assert final["status"] == "cancelled"
    assert final["progress"]["step"] < final["progress"]["total_steps"]
    events = service.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
    # a final checkpoint was written (the API's cleanup pass then drops a finished job's resume checkpoint)
    assert any(e["type"] == "checkpoint" and e["data"]["kind"] == "resume" for e in events)
