"""Bounded storage: DELETE for jobs, datasets and architectures; resume checkpoints of finished jobs,
jobs past the retention period and orphaned upload temp files are removed without anyone asking.

In process on a real SQLite store; the running-job case uses PostgreSQL, Redis and a real worker.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import time
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from helpers.service import (JOB, REDIS, cleanup_redis_queue, postgres_available, redis_available, start_worker,
                             stop, temporary_postgres_database, wait_for)
from store.settings import Settings


@pytest.fixture()
def service(make_api):
    """API client on auth-enabled SQLite with keys alice and bob (`client.as_(who)` gives their headers)."""
    from store.keys import create_key

    client = make_api(auth=True)
    keys = {who: create_key(client.store, who)[1] for who in ("alice", "bob")}
    client.as_ = lambda who: {"Authorization": f"Bearer {keys[who]}"}
    return client


def rows_of(store, job_id: str) -> dict:
    """How many rows of each table still refer to the job."""
    from store.db import Base, Job

    counts = {}
    with store.engine.connect() as connection:
        for table in Base.metadata.sorted_tables:
            column = table.c.get("job_id") if table.name != Job.__tablename__ else table.c.id
            if column is not None:
                counts[table.name] = connection.scalar(select(func.count()).select_from(table)
                                                       .where(column == job_id))
    return counts


def finished_job(store, artifacts, status: str = "succeeded", owner: str = "alice") -> str:
    """A job as a worker leaves it: claimed, a resume checkpoint on the way, exports, then finished."""
    created = store.create_job(JOB, JOB, 10, owner=owner)
    job, token = store.claims.claim(created.id, max_attempts=3)
    assert job.id == created.id  # the only claimable job
    folder = artifacts.job_dir(job.id)
    (folder / "resume.a1.s2.pt").write_bytes(b"x")  # an earlier one, not recorded any more
    for name, kind in (("resume.a1.s5.pt", "resume"), ("dense.safetensors", "dense")):
        (folder / name).write_bytes(b"x" * 100)
        store.checkpoints.add_checkpoint(job.id, kind, 5, name, "0" * 64, 100)
    store.events.add_events(job.id, [{"type": "metrics", "data": {"loss": 1.0}}])
    assert store.leases.finish(job.id, token, status, status)
    return job.id


def test_delete_a_job_removes_its_rows_and_artifacts_and_frees_its_idempotency_key(service):
    from store.artifacts import Artifacts

    artifacts = Artifacts(service.settings.artifact_dir)
    alice = {**service.as_("alice"), "Idempotency-Key": "nightly"}
    done = finished_job(service.store, artifacts)
    queued = service.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    for job_id in (queued, done):
        assert service.delete(f"/v1/jobs/{job_id}", headers=service.as_("bob")).status_code == 404  # not bob's
        response = service.delete(f"/v1/jobs/{job_id}", headers=service.as_("alice"))
        assert response.status_code == 200 and response.json() == {"id": job_id, "object": "job", "deleted": True}
        assert set(rows_of(service.store, job_id).values()) == {0}, rows_of(service.store, job_id)
        assert not (service.settings.artifact_dir / "jobs" / job_id).exists()
        assert service.get(f"/v1/jobs/{job_id}", headers=service.as_("alice")).status_code == 404
        assert service.delete(f"/v1/jobs/{job_id}", headers=service.as_("alice")).status_code == 404
    again = service.post("/v1/jobs", json=JOB, headers=alice)  # the key's record went with its job
    assert again.status_code == 201 and again.json()["id"] != queued and "idempotent-replayed" not in again.headers


def test_delete_a_running_job_is_202_and_cancels_it_first(service):
    from store.deletion import clean_up
    from store.artifacts import Artifacts

    artifacts = Artifacts(service.settings.artifact_dir)
    job_id = service.post("/v1/jobs", json=JOB, headers=service.as_("alice")).json()["id"]
    _, token = service.store.claims.claim(job_id, max_attempts=3)
    response = service.delete(f"/v1/jobs/{job_id}", headers=service.as_("alice"))
    assert response.status_code == 202 and response.json()["deleted"] is False
    job = service.get(f"/v1/jobs/{job_id}", headers=service.as_("alice")).json()
    assert job["status"] == "cancelling" and job["cancel_requested"]
    assert clean_up(service.store, artifacts)["deleted"] == []  # still running: nothing removed under the worker
    assert service.store.leases.finish(job_id, token, "cancelled", "cancelled at step 3")  # what the worker does
    assert clean_up(service.store, artifacts)["deleted"] == [job_id]
    assert set(rows_of(service.store, job_id).values()) == {0}


def test_a_deleted_job_whose_worker_was_lost_is_still_deleted(service):
    from store.artifacts import Artifacts
    from store.deletion import clean_up

    artifacts = Artifacts(service.settings.artifact_dir)
    job_id = service.post("/v1/jobs", json=JOB, headers=service.as_("alice")).json()["id"]
    _, token = service.store.claims.claim(job_id, max_attempts=3)
    assert service.delete(f"/v1/jobs/{job_id}", headers=service.as_("alice")).status_code == 202
    assert service.store.leases.requeue(job_id, token, "worker lost")  # as the reaper does for a dead worker
    assert clean_up(service.store, artifacts)["deleted"] == [job_id]
    assert service.get(f"/v1/jobs/{job_id}", headers=service.as_("alice")).status_code == 404


def _upload(api, headers) -> str:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.standard_normal((100, 8)).astype(np.float32), y=rng.integers(0, 4, 100))
    response = api.post("/v1/datasets?name=toy&format=npz", content=buffer.getvalue(), headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_delete_an_upload_in_use_is_409_naming_the_job(service):
    alice, bob = service.as_("alice"), service.as_("bob")
    dataset = _upload(service, alice)
    path = service.settings.artifact_dir / "datasets" / f"{dataset}.npz"
    arch = service.post("/v1/architectures", headers=alice, json={
        "name": "tiny", "architecture": {"input_shape": [8], "layers": [{"type": "linear", "out_features": 4}]}}
    ).json()["id"]
    job = service.post("/v1/jobs", headers=alice, json={**JOB, "model": {"name": arch},
                                                        "dataset": {"name": "tensors", "path": dataset}})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    for route, field in ((f"/v1/datasets/{dataset}", "dataset_id"), (f"/v1/architectures/{arch}", "arch_id")):
        assert service.delete(route, headers=bob).status_code == 404  # someone else's is as good as missing
        response = service.delete(route, headers=alice)
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "in_use" and error["field"] == field and job_id in error["message"]
    assert path.is_file()
    service.post(f"/v1/jobs/{job_id}/cancel", headers=alice)  # finished: it no longer needs either
    for route in (f"/v1/datasets/{dataset}", f"/v1/architectures/{arch}"):
        response = service.delete(route, headers=alice)
        assert response.status_code == 200 and response.json()["deleted"] is True
        assert service.delete(route, headers=alice).status_code == 404
    assert not path.exists()
    assert service.get("/v1/datasets", headers=alice).json()["data"] == []
    assert service.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "cancelled"
    response = service.post("/v1/jobs", headers=alice, json={**JOB, "dataset": {"name": "tensors", "path": dataset}})
    assert response.status_code == 422 and response.json()["error"]["field"] == "dataset.path"


def test_a_dataset_deleted_while_a_job_is_being_submitted_refuses_that_job(service):
    """The race DELETE /v1/datasets vs POST /v1/jobs: create_job re-checks the upload under the lock."""
    from store.deletion import delete_dataset
    from store.artifacts import Artifacts
    from store.jobs import UploadGone

    dataset = _upload(service, service.as_("alice"))
    assert delete_dataset(service.store, Artifacts(service.settings.artifact_dir), dataset, "alice")
    with pytest.raises(UploadGone):  # resolved before the delete, created after it
        service.store.create_job(JOB, JOB, 1, owner="alice", dataset_id=dataset)


def test_the_cleanup_drops_resume_checkpoints_of_finished_jobs_and_expired_jobs(service):
    from store.artifacts import Artifacts
    from store.db import Job
    from store.deletion import clean_up

    artifacts = Artifacts(service.settings.artifact_dir)
    ids = {status: finished_job(service.store, artifacts, status) for status in ("succeeded", "failed", "cancelled")}
    running = service.store.create_job(JOB, JOB, 10, owner="alice").id
    service.store.claims.claim(running, max_attempts=3)
    (artifacts.job_dir(running) / "resume.pt").write_bytes(b"x")
    service.store.checkpoints.add_checkpoint(running, "resume", 5, "resume.pt", "0" * 64, 1)

    done = clean_up(service.store, artifacts, retention_days=30)
    assert sorted(done["resume_discarded"]) == sorted(ids.values()) and done["expired"] == []
    for job_id in ids.values():
        kinds = [c.kind for c in service.store.checkpoints.list_checkpoints(job_id)]
        assert kinds == ["dense"] and not list((artifacts.root / "jobs" / job_id).glob("resume*"))
        assert (artifacts.root / "jobs" / job_id / "dense.safetensors").is_file()
    assert [c.kind for c in service.store.checkpoints.list_checkpoints(running)] == ["resume"]  # it may still resume
    assert (artifacts.root / "jobs" / running / "resume.pt").is_file()

    old = ids["succeeded"]
    with service.store.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == old).values(
            finished_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=31)))
    assert clean_up(service.store, artifacts)["expired"] == []  # no retention set: kept
    assert clean_up(service.store, artifacts, retention_days=30)["expired"] == [old]
    assert set(rows_of(service.store, old).values()) == {0} and not (artifacts.root / "jobs" / old).exists()
    assert service.store.get_job(ids["failed"]) is not None and service.store.get_job(running) is not None


def test_orphaned_upload_temp_files_are_removed_at_startup(settings, make_api):
    folder = settings.artifact_dir / "datasets"
    folder.mkdir(parents=True)
    old, fresh, kept = folder / ".upload-0a.npz", folder / ".upload-1b.npz", folder / "ds_x.npz"
    for path in (old, fresh, kept):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(kept, (hour_ago, hour_ago))
    assert make_api().get("/healthz").status_code == 200
    assert not old.exists()
    assert fresh.exists() and kept.exists()  # an upload in progress, and a stored dataset


@pytest.mark.slow
@pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                    reason="needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")
def test_with_a_real_worker_a_deleted_running_job_ends_cancelled_then_gone(tmp_path):
    """PostgreSQL, Redis, a real worker process, the API's cleanup thread: DELETE of a training job is
    one call; a job that succeeds keeps its exports but not its resume checkpoint."""
    from api.app import create_app
    from store.jobs import JobStore

    queue = f"rigl-del-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = {**os.environ, "RIGL_DATA_DIR": str(tmp_path), "RIGL_DATABASE_URL": database_url,
               "RIGL_BROKER_URL": REDIS, "RIGL_QUEUE": queue, "RIGL_CANCEL_POLL_SECONDS": "0.3",
               "RIGL_CHECKPOINT_EVERY_STEPS": "5", "RIGL_CHECKPOINT_MIN_SECONDS": "0"}
        settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS, queue=queue, auth=False,
                            cleanup_interval_seconds=0.5)
        worker = start_worker(env, tmp_path / "worker.log")
        store = JobStore(database_url)
        try:
            with TestClient(create_app(settings)) as api:
                short = api.post("/v1/jobs", json=JOB).json()["id"]

                def finished(job_id):
                    job = api.get(f"/v1/jobs/{job_id}").json()
                    return job if job["status"] in ("succeeded", "failed", "cancelled") else None

                assert wait_for(lambda: finished(short), 180, what="the short job")["status"] == "succeeded"
                events = api.get(f"/v1/jobs/{short}/events?limit=1000").json()["data"]
                assert any(e["type"] == "checkpoint" and e["data"]["kind"] == "resume" for e in events)
                wait_for(lambda: [c["kind"] for c in api.get(f"/v1/jobs/{short}/checkpoints").json()["data"]]
                         == ["dense", "packed", "compressed", "onnx"], 10, what="the resume checkpoint to be dropped")
                job_dir = tmp_path / "artifacts" / "jobs" / short
                assert not list(job_dir.glob("resume*")) and (job_dir / "report.json").is_file()

                long = api.post("/v1/jobs", json={**JOB, "training": {"epochs": 400, "batch_size": 64}}).json()["id"]
                wait_for(lambda: api.get(f"/v1/jobs/{long}").json()["progress"]["step"] > 20, 120,
                         what="the long job to train")
                assert list((tmp_path / "artifacts" / "jobs" / long).glob("resume*.pt"))
                response = api.delete(f"/v1/jobs/{long}")
                assert response.status_code == 202, response.text
                wait_for(lambda: api.get(f"/v1/jobs/{long}").status_code == 404, 60, what="the deletion")
                assert set(rows_of(store, long).values()) == {0}, rows_of(store, long)
                assert not (tmp_path / "artifacts" / "jobs" / long).exists()
                for route in ("/v1/jobs/{}", "/v1/datasets/{}", "/v1/architectures/{}"):  # NUL: an error in PostgreSQL
                    refused = api.delete(route.format("job_%00"))  # the text guard's 422, before any query
                    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_text"
                assert worker.poll() is None
        finally:
            stop(worker)
            cleanup_redis_queue(queue)


def exported_job(store, artifacts, owner: str = "alice") -> str:
    """A succeeded job of JOB's model with a real dense export (a safetensors state_dict), as
    `model.init_from_job` reads it."""
    from safetensors.torch import save_file

    from rigl_core.models.registry import build_model

    created = store.create_job(JOB, JOB, 10, owner=owner)
    job, token = store.claims.claim(created.id, max_attempts=3)
    path = artifacts.job_dir(job.id) / "dense.safetensors"
    save_file(build_model("mlp", 10, [1, 8, 8]).state_dict(), str(path))
    store.checkpoints.add_checkpoint(job.id, "dense", 5, path.name, "0" * 64, path.stat().st_size)
    assert store.leases.finish(job.id, token, "succeeded", "done")
    return job.id


def test_deleting_a_job_another_active_job_starts_from_is_409_naming_it(service):
    """`model.init_from_job: src` is rewritten into a key under src's artifacts: deleting src under a
    queued job used to answer 200, and the queued job failed when it ran."""
    from store.artifacts import Artifacts

    artifacts = Artifacts(service.settings.artifact_dir)
    alice = service.as_("alice")
    source = exported_job(service.store, artifacts)
    response = service.post("/v1/jobs", json={**JOB, "model": {"name": "mlp", "init_from_job": source}},
                            headers=alice)
    assert response.status_code == 201, response.text
    dependant = response.json()["id"]
    refused = service.delete(f"/v1/jobs/{source}", headers=alice)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "in_use" and error["field"] == "job_id" and dependant in error["message"]
    assert service.get(f"/v1/jobs/{source}", headers=alice).json()["status"] == "succeeded"  # untouched
    assert (service.settings.artifact_dir / "jobs" / source / "dense.safetensors").is_file()
    assert service.post(f"/v1/jobs/{dependant}/cancel", headers=alice).status_code == 202
    assert service.delete(f"/v1/jobs/{source}", headers=alice).json() == {"id": source, "object": "job",
                                                                          "deleted": True}


def test_a_job_submitted_from_a_job_being_deleted_is_refused(service):
    """The submission read the source before a concurrent DELETE marked it: the creating transaction
    looks again under the owner's lock, so the new job never points at a deleted export."""
    from store.artifacts import Artifacts
    from store.deletion import _mark_pending
    from store.jobs import UploadGone

    artifacts = Artifacts(service.settings.artifact_dir)
    source = exported_job(service.store, artifacts)
    with service.store.sessions.begin() as s:
        _mark_pending(service.store, s, source)
    spec = {**JOB, "model": {"name": "mlp", "init_from_job": source}}
    with pytest.raises(UploadGone) as gone:
        service.store.create_job(spec, spec, 10, owner="alice", source_job_id=source)
    assert gone.value.field == "model.init_from_job"


def test_deleting_a_job_a_held_sweep_child_starts_from_is_409(make_api):
    from store.artifacts import Artifacts

    client = make_api(max_active_jobs_per_owner=1)
    source = exported_job(client.store, Artifacts(client.settings.artifact_dir), owner="local")
    base = {**JOB, "model": {"name": "mlp", "init_from_job": source}}
    sweep = client.post("/v1/sweeps", json={"base": base, "grid": {"seed": [1, 2]}})
    assert sweep.status_code == 201, sweep.text
    child = next(c["id"] for c in sweep.json()["children"] if c["id"])
    assert client.post(f"/v1/jobs/{child}/cancel").status_code == 202  # the other child is still held
    refused = client.delete(f"/v1/jobs/{source}")
    assert refused.status_code == 409 and sweep.json()["id"] in refused.json()["error"]["message"]


@pytest.mark.skipif(not postgres_available() and not os.environ.get("CI"), reason="needs PostgreSQL")
def test_concurrent_deletes_of_one_job_delete_it_once_without_errors_on_postgresql(make_api):
    """Ten DELETEs of one job at once used to deadlock on its child rows (answered 503) and several
    answered `deleted: true`. Each transaction now locks the job row first: one answers 200, the others
    answer as a repeated delete does (404), and nothing is left."""
    import threading

    from store.artifacts import Artifacts

    with temporary_postgres_database() as url:
        client = make_api(database_url=url, auth=False)
        artifacts = Artifacts(client.settings.artifact_dir)
        for _round in range(3):
            job_id = finished_job(client.store, artifacts, owner="local")
            client.store.events.add_events(job_id, [{"type": "metrics", "data": {"loss": float(i)}}
                                                    for i in range(200)])
            start, answers = threading.Barrier(10), []

            def delete():
                start.wait()
                answers.append(client.delete(f"/v1/jobs/{job_id}"))

            threads = [threading.Thread(target=delete) for _ in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            codes = sorted(a.status_code for a in answers)
            assert codes == [200] + [404] * 9, [a.text for a in answers]
            assert [a.json() for a in answers if a.status_code == 200] == [{"id": job_id, "object": "job",
                                                                             "deleted": True}]
            assert set(rows_of(client.store, job_id).values()) == {0}, rows_of(client.store, job_id)
        client.store.engine.dispose()
    print("\nreliability: concurrent deletes: 3 rounds of 10 DELETEs of one job on PostgreSQL: each round one 200, "
          "nine 404, 0 5xx, no row left")
