"""Artifacts in an S3-compatible bucket: against a real S3-protocol server (moto's standalone server,
started here as its own process) through real boto3, with real SQLite stores.

The store contract (put/get/stream/list/copy/delete) runs against the local folder and the bucket
alike; then the service: uploads land in the bucket, stored specs hold storage keys, downloads stream
or redirect to a presigned URL, and a worker with its own empty folder finishes a job that another
worker (with another folder) started, each worker a process of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers.s3 import AWS_ENV, moto_server, new_bucket
from helpers.service import (REDIS, ROOT, cleanup_redis_queue, free_port, postgres_available, redis_available,
                             start_worker, temporary_postgres_database, wait_for)
from store.artifacts import DATASET_KEY, WEIGHTS_KEY, Artifacts, MissingArtifact
from store.object_store import BadKey, LocalStore, S3Store, check_key
from store.settings import Settings

pytest.importorskip("boto3")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free port, for the whole session; the AWS variables point boto3 at it."""
    pytest.importorskip("moto.server")
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def bucket(s3_endpoint):
    return new_bucket(s3_endpoint)


def s3_settings(tmp_path: Path, folder: str, endpoint: str, bucket: str, **extra) -> Settings:
    """Settings of one node: its own data folder (and so its own local artifact folder), one bucket."""
    return Settings(data_dir=tmp_path / folder, database_url=f"sqlite:///{tmp_path / 'rigl.db'}",
                    artifact_url=f"s3://{bucket}/artifacts", s3_endpoint_url=endpoint, **extra).resolved()


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(request.getfixturevalue("bucket"), "some/prefix", endpoint_url=endpoint)


# ------------------------------------------------------------------------------------ the contract
def test_put_get_stream_list_copy_delete(any_store, tmp_path):
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several stream chunks, the last one short
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    any_store.put_file("jobs/job_a/model.safetensors", source)
    any_store.put_file("jobs/job_a/resume.a1.s5.pt", source)
    any_store.put_file("jobs/job_b/report.json", source)

    assert any_store.size("jobs/job_a/model.safetensors") == len(payload)
    assert any_store.size("jobs/job_a/none") is None and not any_store.exists("jobs/job_a/none")
    size, chunks = any_store.open_chunks("jobs/job_a/model.safetensors", chunk_size=1 << 20)
    pieces = list(chunks)
    assert size == len(payload) and b"".join(pieces) == payload and len(pieces) >= 4
    dest = tmp_path / "elsewhere" / "copy.bin"
    any_store.get_file("jobs/job_a/model.safetensors", dest)
    assert dest.read_bytes() == payload and list(dest.parent.iterdir()) == [dest]  # no temp file left

    assert any_store.list("jobs/job_a/") == ["jobs/job_a/model.safetensors", "jobs/job_a/resume.a1.s5.pt"]
    assert any_store.list("jobs/job_a/resume") == ["jobs/job_a/resume.a1.s5.pt"]
    assert any_store.list("jobs/job_c/") == []
    any_store.copy("jobs/job_a/resume.a1.s5.pt", "jobs/job_a/resume.a2.s9.pt")
    assert any_store.read_bytes("jobs/job_a/resume.a2.s9.pt") == payload

    any_store.delete("jobs/job_a/resume.a1.s5.pt")
    any_store.delete("jobs/job_a/never-existed")  # no error
    assert any_store.delete_prefix("jobs/job_a/") == 2
    assert any_store.list("jobs/") == ["jobs/job_b/report.json"]
    with pytest.raises(FileNotFoundError):
        any_store.get_file("jobs/job_a/model.safetensors", dest)
    with pytest.raises(FileNotFoundError):
        any_store.open_chunks("jobs/job_a/model.safetensors")
    assert any_store.read_bytes("jobs/job_a/model.safetensors") is None


BAD_KEYS = ["", "/etc/passwd", "../x", "jobs/../../x", "jobs//x", "jobs/./x", ".upload-1", "jobs/.hidden",
            "jobs\\x", "jobs/x\x00", "jobs/ x", "jobs/x/", "a" * 2000, None, 7]


def test_keys_are_relative_and_allow_listed(any_store, tmp_path):
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for key in BAD_KEYS:
        with pytest.raises(BadKey):
            check_key(key)
        for call in (lambda: any_store.put_file(key, source), lambda: any_store.size(key),
                     lambda: any_store.delete(key), lambda: any_store.open_chunks(key)):
            with pytest.raises(BadKey):
                call()
    assert check_key("jobs/job_0123/resume.a1.s200.pt") == "jobs/job_0123/resume.a1.s200.pt"
    assert not list(tmp_path.glob("x*")) and (tmp_path / "f").read_bytes() == b"x"


def test_a_local_store_never_follows_a_link_out_of_its_root(tmp_path):
    root, outside = tmp_path / "store", tmp_path / "outside"
    (root / "jobs").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (root / "jobs" / "job_x").symlink_to(outside)  # a folder that leads out
    (root / "jobs" / "link").symlink_to(outside / "secret")  # a file that does
    store = LocalStore(root)
    for key in ("jobs/job_x/secret", "jobs/link"):
        with pytest.raises(PermissionError):
            store.open_chunks(key)
    with pytest.raises(PermissionError):
        store.delete("jobs/job_x/secret")
    store.delete("jobs/link")  # removes the link itself, never its target
    assert (outside / "secret").read_text() == "secret" and not (root / "jobs" / "link").is_symlink()


@pytest.mark.slow
def test_s3_prefixes_keep_stores_apart(s3_endpoint, bucket, tmp_path):
    source = tmp_path / "f"
    source.write_bytes(b"one")
    first, second = (S3Store(bucket, p, endpoint_url=s3_endpoint) for p in ("one", "two/deeper"))
    first.put_file("jobs/job_a/report.json", source)
    assert second.list("jobs/") == [] and second.size("jobs/job_a/report.json") is None
    assert first.list("jobs/") == ["jobs/job_a/report.json"]
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["one/jobs/job_a/report.json"]


def test_the_artifact_url_is_checked():
    with pytest.raises(ValueError, match="RIGL_ARTIFACT_URL"):
        Settings(artifact_url="https://bucket/prefix")
    with pytest.raises(ValueError, match="RIGL_ARTIFACT_URL"):
        Settings(artifact_url="s3://bucket/../x")
    assert Settings(artifact_url="").artifact_url is None  # unset: the local folder


# ------------------------------------------------------------------------------------ Artifacts
def test_artifacts_cache_keys_locally_and_map_old_absolute_paths(s3_endpoint, bucket, tmp_path):
    node_a = Artifacts.from_settings(s3_settings(tmp_path, "a", s3_endpoint, bucket))
    node_b = Artifacts.from_settings(s3_settings(tmp_path, "b", s3_endpoint, bucket))
    assert node_a.remote and node_b.remote and node_a.root != node_b.root
    key = node_a.dataset_key("ds_" + "1" * 20, "npz")
    tmp = node_a.root / "datasets" / ".upload-x"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"0123456789")
    node_a.place(tmp, key, keep_local=False)
    assert not (node_a.root / key).exists()  # the bucket keeps the only copy

    path = node_b.fetch(key)
    assert path == node_b.root / key and path.read_bytes() == b"0123456789"
    path.write_bytes(b"stale")  # a cached copy of the wrong size is fetched again
    assert node_b.fetch(key, size=10).read_bytes() == b"0123456789"
    with pytest.raises(MissingArtifact):
        node_b.fetch(node_b.weights_key("w_" + "2" * 20))

    # specs stored before keys held absolute paths under the root: they map to keys; others do not
    assert node_b.spec_key(str(node_b.root / key), DATASET_KEY) == key
    assert node_b.spec_key(key, DATASET_KEY) == key
    assert node_b.spec_key("/etc/passwd", DATASET_KEY) is None
    assert node_b.spec_key("datasets/../../etc/passwd", DATASET_KEY) is None
    assert node_b.spec_key("jobs/job_" + "3" * 20 + "/resume.a1.s2.pt", WEIGHTS_KEY) is None
    assert node_b.spec_key("jobs/job_" + "3" * 20 + "/model.safetensors", WEIGHTS_KEY) is not None

    node_b.remove(key)
    assert not path.exists() and node_a.store.size(key) is None


def test_the_local_default_keeps_its_layout(tmp_path):
    """Unset RIGL_ARTIFACT_URL: the folder is the store; keys are its relative paths, nothing copied."""
    settings = Settings(data_dir=tmp_path).resolved()
    artifacts = Artifacts.from_settings(settings)
    assert not artifacts.remote and isinstance(artifacts.store, LocalStore)
    final = artifacts.job_file("job_" + "a" * 20, "model.safetensors")
    artifacts.job_dir("job_" + "a" * 20)
    final.write_bytes(b"w")
    assert artifacts.upload(final) == "jobs/job_" + "a" * 20 + "/model.safetensors"
    assert artifacts.fetch("jobs/job_" + "a" * 20 + "/model.safetensors") == final
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "artifacts/jobs/job_" + "a" * 20 + "/model.safetensors"]


# ------------------------------------------------------------------------------------ the service
TENSORS_JOB = {"model": {"name": "mlp", "hidden_sizes": [32]},
               "dataset": {"name": "tensors", "path": None},
               "sparsity": {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "schedule": {"delta_t": 5}},
               "training": {"epochs": 2, "batch_size": 32}}


def _npz(samples: int = 256) -> bytes:
    buffer, rng = io.BytesIO(), np.random.default_rng(0)
    np.savez(buffer, x=rng.standard_normal((samples, 8)).astype(np.float32), y=rng.integers(0, 3, samples))
    return buffer.getvalue()


def _bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture()
def api_node(tmp_path, s3_endpoint, bucket):
    """The API on its own folder, artifacts in the bucket, auth off."""
    from api.app import create_app

    settings = s3_settings(tmp_path, "api", s3_endpoint, bucket, auth=False)
    with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as client:
        client.settings = settings
        yield client


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_uploads_and_exports_go_through_the_bucket_and_specs_hold_keys(api_node, tmp_path, s3_endpoint, bucket):
    """The API and an in-process worker on different folders: the dataset goes up from the API, the
    worker fetches it, its exports go up, the API streams them back, and deletion empties the bucket."""
    from store.jobs import JobStore
    from worker.runner import run_job

    api = api_node
    dataset = api.post("/v1/datasets?name=toy&format=npz", content=_npz()).json()["id"]
    assert _bucket_keys(s3_endpoint, bucket) == [f"artifacts/datasets/{dataset}.npz"]
    job = api.post("/v1/jobs", json={**TENSORS_JOB, "dataset": {"name": "tensors", "path": dataset}})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    store = JobStore(api.settings.database_url)
    resolved = json.dumps(store.get_job(job_id).resolved_spec)
    assert f'"path": "datasets/{dataset}.npz"' in resolved and str(tmp_path) not in resolved

    worker = s3_settings(tmp_path, "worker", s3_endpoint, bucket)
    assert run_job(job_id, worker, store) == "succeeded"
    assert _files(worker.artifact_dir) == [f"datasets/{dataset}.npz"]  # its job folder went after the run
    keys = _bucket_keys(s3_endpoint, bucket)
    assert {f"artifacts/jobs/{job_id}/{n}" for n in ("model.safetensors", "model.packed.safetensors",
                                                     "report.json")} <= set(keys), keys
    assert not any(k.endswith(".tmp") for k in keys)

    download = api.get(f"/v1/jobs/{job_id}/checkpoint")
    assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(download.content).hexdigest() == download.headers["x-content-sha256"]
    assert int(download.headers["content-length"]) == len(download.content)
    assert api.get(f"/v1/jobs/{job_id}/sparsity").json()["final"] is True  # report.json read from the bucket

    second = api.post("/v1/jobs", json={**TENSORS_JOB, "dataset": {"name": "tensors", "path": dataset},
                                        "model": {**TENSORS_JOB["model"], "init_from_job": job_id}})
    assert second.status_code == 201, second.text
    weights = store.get_job(second.json()["id"]).resolved_spec["model"]["weights"]
    assert weights == f"jobs/{job_id}/model.safetensors"  # a key, fetched by whichever worker runs it
    api.post(f"/v1/jobs/{second.json()['id']}/cancel")
    assert api.delete(f"/v1/jobs/{second.json()['id']}").status_code == 200

    assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert api.delete(f"/v1/datasets/{dataset}").status_code == 200
    assert _bucket_keys(s3_endpoint, bucket) == []
    assert api.get(f"/v1/jobs/{job_id}/checkpoint").status_code == 404


def test_presigned_downloads_redirect_to_the_bucket(tmp_path, s3_endpoint, bucket):
    import httpx

    from api.app import create_app
    from store.jobs import JobStore

    settings = s3_settings(tmp_path, "api", s3_endpoint, bucket, auth=False, s3_presigned_downloads=True)
    store = JobStore(settings.database_url)
    job = store.create_job(TENSORS_JOB, TENSORS_JOB, 10)
    claimed, token = store.claims.claim(job.id, max_attempts=3)
    payload = os.urandom(100_000)
    artifacts = Artifacts.from_settings(settings)
    path = artifacts.job_file(job.id, "model.safetensors")
    artifacts.job_dir(job.id)
    path.write_bytes(payload)
    artifacts.upload(path)
    path.unlink()
    digest = hashlib.sha256(payload).hexdigest()
    store.checkpoints.add_checkpoint(job.id, "dense", 10, "model.safetensors", digest, len(payload), token=token)
    with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:
        response = api.get(f"/v1/jobs/{job.id}/checkpoint", follow_redirects=False)
        assert response.status_code == 307 and response.headers["x-content-sha256"] == digest
        location = response.headers["location"]
        assert location.startswith(f"{s3_endpoint}/{bucket}/artifacts/jobs/{job.id}/model.safetensors?")
        assert "X-Amz-Signature" in location
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content == payload
        tampered = location.replace(f"jobs/{job.id}/model.safetensors", f"jobs/{job.id}/report.json")
        assert httpx.get(tampered).status_code == 403  # the signature covers the key


DRIVER = """
import sys, threading
import worker.runner as runner
from store.jobs import JobStore
from store.settings import Settings

job_id, stop_at = sys.argv[1], int(sys.argv[2])
settings = Settings().resolved()
stop = threading.Event()
on_step = runner.StoreCallback.on_step

def stopping_at(self, trainer, metrics):  # what the SIGTERM of a preempted node does: checkpoint and requeue
    on_step(self, trainer, metrics)
    if stop_at and trainer.step >= stop_at:
        stop.set()

runner.StoreCallback.on_step = stopping_at
print("OUTCOME", runner.run_job(job_id, settings, JobStore(settings.database_url), stop))
"""


def _worker_process(tmp_path: Path, folder: str, endpoint: str, bucket: str, job_id: str, stop_at: int) -> str:
    env = {**os.environ, **AWS_ENV, "RIGL_DATA_DIR": str(tmp_path / folder),
           "RIGL_DATABASE_URL": f"sqlite:///{tmp_path / 'rigl.db'}", "RIGL_ARTIFACT_URL": f"s3://{bucket}/artifacts",
           "RIGL_S3_ENDPOINT_URL": endpoint, "RIGL_CANCEL_POLL_SECONDS": "0.1", "PYTHONPATH": str(ROOT)}
    env.pop("RIGL_ARTIFACT_DIR", None)
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", DRIVER, job_id, str(stop_at)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    print(f"worker {folder}: {time.monotonic() - began:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.rsplit("OUTCOME", 1)[1].strip()


@pytest.mark.slow
def test_a_worker_with_an_empty_folder_finishes_a_job_another_worker_started(api_node, tmp_path, s3_endpoint,
                                                                             bucket):
    """Worker A (its own folder) trains partway, is stopped, checkpoints into the bucket and requeues;
    worker B (another, empty folder) resumes from that checkpoint and finishes; the API (a third folder)
    serves the export from the bucket. Each worker is a process of its own: run_job driven directly."""
    from store.jobs import JobStore

    api = api_node
    dataset = api.post("/v1/datasets?name=toy&format=npz", content=_npz(512)).json()["id"]
    spec = {**TENSORS_JOB, "dataset": {"name": "tensors", "path": dataset},
            "training": {**TENSORS_JOB["training"], "epochs": 4, "batch_size": 16}}  # 4 × 29 steps
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    store = JobStore(api.settings.database_url)

    assert _worker_process(tmp_path, "worker-a", s3_endpoint, bucket, job_id, stop_at=30) == "requeued"
    stopped = store.get_job(job_id)
    resume = store.checkpoints.latest_checkpoint(job_id, "resume")
    assert stopped.status == "requeued" and resume is not None and resume.step == 30 < stopped.total_steps
    assert f"artifacts/jobs/{job_id}/{resume.filename}" in _bucket_keys(s3_endpoint, bucket)
    assert not (tmp_path / "worker-a" / "artifacts" / "jobs" / job_id).exists()  # released after the run

    assert not (tmp_path / "worker-b").exists()
    outcome = _worker_process(tmp_path, "worker-b", s3_endpoint, bucket, job_id, stop_at=0)
    assert outcome == "succeeded", store.get_job(job_id).error_message
    events = api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    resumed = [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in (e["data"] or {})]
    assert resumed == [resume.step]
    done = store.get_job(job_id)
    assert done.status == "succeeded" and done.step == done.total_steps and done.attempt == 2
    assert _files(tmp_path / "worker-b" / "artifacts") == [f"datasets/{dataset}.npz"]  # only its input, fetched

    download = api.get(f"/v1/jobs/{job_id}/checkpoint?format=packed")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == store.checkpoints.latest_checkpoint(job_id, "packed").sha256
    assert _files(api.settings.artifact_dir) == []  # streamed from the bucket, nothing cached by the API
    from store.deletion import clean_up

    assert clean_up(store, api.app.state.context.artifacts)["resume_discarded"] == [job_id]
    assert not [k for k in _bucket_keys(s3_endpoint, bucket) if "/resume." in k]


@pytest.mark.slow
def test_an_unreachable_bucket_refuses_an_upload_with_503_and_keeps_no_record(tmp_path, s3_endpoint):
    """A bucket that can't be reached (nothing listens on its port): the upload is a 503 naming no
    server detail, its record is undone and nothing is left in the API's folder."""
    from api.app import create_app
    from store.object_store import is_store_outage

    settings = Settings(data_dir=tmp_path, auth=False, artifact_url="s3://nowhere/artifacts", s3_max_attempts=1,
                        s3_endpoint_url=f"http://127.0.0.1:{free_port()}").resolved()
    artifacts = Artifacts.from_settings(settings)
    try:
        artifacts.store.size("datasets/x.npz")
    except Exception as error:  # noqa: BLE001 - the point is which kind it is
        assert is_store_outage(error), repr(error)
    else:
        raise AssertionError("an unreachable endpoint answered")
    with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:
        response = api.post("/v1/datasets?name=toy&format=npz", content=_npz())
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable" and "127.0.0.1" not in response.text
        assert api.get("/v1/datasets").json()["data"] == []
    assert _files(settings.artifact_dir) == []


def test_a_spec_stored_with_an_absolute_path_still_runs(make_api, tmp_path):
    """Specs stored before storage keys held the upload's absolute path under the artifact folder: the
    worker maps it to its key and runs it (local default, unchanged layout)."""
    from store.jobs import JobStore
    from worker.runner import run_job

    api = make_api(auth=False)
    settings = api.settings
    dataset = api.post("/v1/datasets?name=toy&format=npz", content=_npz()).json()["id"]
    old = str(settings.artifact_dir / "datasets" / f"{dataset}.npz")
    spec = {**TENSORS_JOB, "dataset": {"name": "tensors", "path": old}}
    store = JobStore(settings.database_url)
    job = store.create_job({**TENSORS_JOB, "dataset": {"name": "tensors", "path": dataset}}, spec, 16)
    assert run_job(job.id, settings, store) == "succeeded", store.get_job(job.id).error_message
    assert (settings.artifact_dir / "jobs" / job.id / "model.safetensors").is_file()  # the local store keeps it


@pytest.mark.slow
@pytest.mark.serial  # 3-second leases, and the SIGTERM must land mid-job: one at a time, beside niced tests only
@pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                    reason="needs PostgreSQL and Redis")
def test_real_celery_workers_on_two_folders_hand_a_job_over_through_the_bucket(tmp_path, s3_endpoint, bucket):
    """The same hand-over with real parts: PostgreSQL, Redis and two Celery worker processes, each with
    its own empty data folder. Worker A is shut down warm (SIGTERM, as a deploy or a preempted node
    does) mid-job: it checkpoints into the bucket and requeues; worker B resumes from the bucket."""
    import signal

    from api.app import create_app
    from store.jobs import JobStore

    queue = f"rigl-s3-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        common = {**{k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}, **AWS_ENV,
                  "RIGL_DATABASE_URL": database_url, "RIGL_BROKER_URL": REDIS, "RIGL_QUEUE": queue,
                  "RIGL_ARTIFACT_URL": f"s3://{bucket}/artifacts", "RIGL_S3_ENDPOINT_URL": s3_endpoint,
                  "RIGL_LEASE_SECONDS": "3", "RIGL_CANCEL_POLL_SECONDS": "0.2", "RIGL_REAPER_INTERVAL_SECONDS": "0.5"}
        settings = Settings(data_dir=tmp_path / "api", database_url=database_url, broker_url=REDIS, queue=queue,
                            artifact_url=f"s3://{bucket}/artifacts", s3_endpoint_url=s3_endpoint, auth=False,
                            reaper=False)
        workers = []
        try:
            with TestClient(create_app(settings)) as api:
                dataset = api.post("/v1/datasets?name=toy&format=npz", content=_npz(512)).json()["id"]
                spec = {**TENSORS_JOB, "dataset": {"name": "tensors", "path": dataset},
                        "training": {**TENSORS_JOB["training"], "epochs": 40, "batch_size": 16}}  # 40 × 29 steps
                job_id = api.post("/v1/jobs", json=spec).json()["id"]
            store = JobStore(database_url)
            workers.append(start_worker({**common, "RIGL_DATA_DIR": str(tmp_path / "worker-a")}, tmp_path / "a.log"))
            wait_for(lambda: (lambda j: j.status == "running" and j.step >= 30)(store.get_job(job_id)), 120,
                     interval=0.1, what="worker A training")
            workers[0].send_signal(signal.SIGTERM)  # warm shutdown: checkpoint at the next step, requeue
            workers[0].wait(60)
            stopped = store.get_job(job_id)
            resume = store.checkpoints.latest_checkpoint(job_id, "resume")
            assert stopped.status == "requeued" and resume is not None, (stopped.status, resume)
            assert not (tmp_path / "worker-b").exists()
            workers.append(start_worker({**common, "RIGL_DATA_DIR": str(tmp_path / "worker-b")}, tmp_path / "b.log"))
            done = wait_for(lambda: (lambda j: j if j.status in ("succeeded", "failed") else None)(
                store.get_job(job_id)), 180, interval=0.3, what="worker B finishing the job")
            assert done.status == "succeeded", done.error_message
            assert done.step == done.total_steps and store.get_job(job_id).preemptions == 1
            events = store.events.list_events(job_id, 0, 10_000)
            resumed = [e.data["resumed_from_step"] for e in events if "resumed_from_step" in (e.data or {})]
            assert resumed == [resume.step]  # B started from A's checkpoint, fetched from the bucket
            assert f"artifacts/jobs/{job_id}/model.packed.safetensors" in _bucket_keys(s3_endpoint, bucket)
            assert not (tmp_path / "worker-b" / "artifacts" / "jobs" / job_id).exists()  # B cleared its copy
        finally:
            for worker in workers:
                worker.kill()
                worker.wait(30)
            cleanup_redis_queue(queue)
