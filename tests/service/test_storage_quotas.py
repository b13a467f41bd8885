"""Per-owner storage quotas for uploaded weights, uploaded datasets and job artifacts (issue 24, item 2).

One owner stored 10 × 48 MiB of weights with no limit. Now each kind has a byte and a count quota
(RIGL_QUOTA_*): past one, uploads and submissions get 413 `quota_exceeded` with the quota and the
owner's usage, and `GET /v1/usage` (Client.usage, `rigl usage`) shows each owner's own. The real API
in process with keys on; the race test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save

from helpers.service import JOB, postgres_available, temporary_postgres_database
from store import quotas
from store.settings import Settings

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture()
def make_service(tmp_path):
    """make_service(**settings): the API with keys on for alice and bob; `.as_(owner)` gives headers."""
    from contextlib import ExitStack

    from api.app import create_app
    from store.keys import create_key

    with ExitStack() as opened:
        def make(**overrides):
            settings = Settings(data_dir=tmp_path, auth=True, **overrides).resolved()
            client = opened.enter_context(TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)))
            store = client.app.state.context.store
            keys = {owner: create_key(store, owner)[1] for owner in ("alice", "bob")}
            client.as_ = lambda owner: {"Authorization": f"Bearer {keys[owner]}"}
            client.settings, client.store = settings, store
            return client

        yield make


def weights_file(values: int = 1000) -> bytes:
    return save({"w": np.ones(values, np.float32)})


def dataset_file() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((20, 4), np.float32), y=np.arange(20) % 2)
    return buffer.getvalue()


def upload(api, owner: str, kind: str, data, name: str = "x"):
    return api.post(f"/v1/{kind}", params={"name": name}, content=data, headers={**OCTET, **api.as_(owner)})


def over_quota(response, kind: str, **usage) -> dict:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded" and error["quota"]["kind"] == kind, error
    assert {key: error["quota"][key] for key in usage} == usage, error
    assert "GET /v1/usage" in error["message"]
    return error


def test_uploads_past_a_count_quota_get_413_with_the_usage_and_fit_again_after_a_delete(make_service):
    api = make_service(quota_weights_count=2, quota_datasets_count=1)
    size = len(weights_file())
    first = [upload(api, "alice", "weights", weights_file(), f"w{i}").json()["id"] for i in range(2)]
    error = over_quota(upload(api, "alice", "weights", weights_file()), "weights", count=2, max_count=2,
                       bytes=2 * size, counts="files")
    assert "2 of 2 files kept" in error["message"] and error["field"] == "body"
    assert upload(api, "bob", "weights", weights_file()).status_code == 201  # another owner's own quota
    assert upload(api, "alice", "datasets", dataset_file()).status_code == 201
    over_quota(upload(api, "alice", "datasets", dataset_file()), "datasets", count=1, max_count=1)
    assert api.delete(f"/v1/weights/{first[0]}", headers=api.as_("alice")).status_code == 200
    assert upload(api, "alice", "weights", weights_file()).status_code == 201
    assert len(list((api.settings.artifact_dir / "weights").glob(".upload-*"))) == 0  # no temp file left


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_upload_past_the_byte_quota_is_refused_before_or_after_its_body(make_service, declared):
    """With a Content-Length the refusal comes before the body is read; a chunked body is refused
    once received, by the transaction that would store it."""
    size = len(weights_file())
    api = make_service(quota_weights_bytes=size + size // 2)
    assert upload(api, "alice", "weights", weights_file()).status_code == 201
    data = weights_file() if declared else iter([weights_file()[:100], weights_file()[100:]])
    over_quota(upload(api, "alice", "weights", data), "weights", bytes=size, max_bytes=size + size // 2, count=1)
    assert len(api.get("/v1/weights", headers=api.as_("alice")).json()["data"]) == 1
    assert [p.name for p in (api.settings.artifact_dir / "weights").iterdir() if p.name.startswith(".upload")] == []
    assert upload(api, "alice", "weights", weights_file(values=10)).status_code == 201  # a small one still fits


def test_jobs_and_sweeps_past_the_artifacts_quota_get_413(make_service):
    api = make_service(quota_artifacts_count=3, quota_artifacts_bytes=10_000, max_active_jobs_per_owner=50)
    alice = api.as_("alice")
    jobs = [api.post("/v1/jobs", json=JOB, headers=alice).json()["id"] for _ in range(2)]
    sweep = {"base": JOB, "grid": {"seed": [1, 2]}}
    over_quota(api.post("/v1/sweeps", json=sweep, headers=alice), "artifacts", count=2, max_count=3, counts="jobs")
    assert api.get("/v1/sweeps", headers=alice).json()["data"] == []  # nothing of the sweep was stored
    api.store.checkpoints.add_checkpoint(jobs[0], "dense", 5, "model.safetensors", "0" * 64, 10_000)
    error = over_quota(api.post("/v1/jobs", json=JOB, headers=alice), "artifacts", bytes=10_000, max_bytes=10_000)
    assert error.get("field") is None
    assert api.post("/v1/jobs", json=JOB, headers=api.as_("bob")).status_code == 201
    assert api.delete(f"/v1/jobs/{jobs[0]}", headers=alice).status_code == 200  # frees its bytes and its place
    assert [api.post("/v1/jobs", json=JOB, headers=alice).status_code for _ in range(2)] == [201, 201]
    over_quota(api.post("/v1/jobs", json=JOB, headers=alice), "artifacts", count=3, max_count=3)


def test_usage_shows_each_owner_their_own(make_service, monkeypatch, capsys):
    import rigl_core.cli as cli
    from rigl_core.client import Client

    api = make_service(quota_weights_bytes=None, quota_datasets_count=None)
    weights = upload(api, "alice", "weights", weights_file()).json()
    dataset = upload(api, "alice", "datasets", dataset_file()).json()
    job = api.post("/v1/jobs", json=JOB, headers=api.as_("alice")).json()["id"]
    api.store.checkpoints.add_checkpoint(job, "resume", 5, "resume.pt", "0" * 64, 1234)
    usage = api.get("/v1/usage", headers=api.as_("alice")).json()
    assert usage["owner"] == "alice"
    assert usage["weights"] == {"bytes": weights["size"], "count": 1, "counts": "files", "max_bytes": None,
                                "max_count": api.settings.quota_weights_count}
    assert usage["datasets"] == {"bytes": dataset["size"], "count": 1, "counts": "files",
                                 "max_bytes": api.settings.quota_datasets_bytes, "max_count": None}
    assert (usage["artifacts"]["bytes"], usage["artifacts"]["count"], usage["artifacts"]["counts"]) == (1234, 1, "jobs")
    bob = api.get("/v1/usage", headers=api.as_("bob")).json()
    assert [bob[kind]["bytes"] + bob[kind]["count"] for kind in quotas.KINDS] == [0, 0, 0]
    client = Client("http://testserver", retries=0)
    client.http = api  # the client's (and `rigl usage`'s) requests go to the API in process
    api.headers.update(api.as_("alice"))
    assert client.usage()["weights"]["count"] == 1
    monkeypatch.setattr(cli, "_client", lambda: client)
    assert cli.main(["usage"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "weights" and lines[0].endswith(f"1 of {api.settings.quota_weights_count} files")
    assert lines[1].endswith("1 files") and lines[2].startswith("artifacts") and lines[2].endswith("1 of 10,000 jobs")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_concurrent_uploads_never_overshoot_the_count_quota(database, tmp_path):
    """Eight threads add weights rows for one owner at once under a quota of three: exactly three land."""
    from contextlib import nullcontext

    from store.jobs import JobStore

    if database == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL here")
    with (temporary_postgres_database() if database == "postgresql" else nullcontext(None)) as url:
        store = JobStore(url or f"sqlite:///{tmp_path / 'rigl.db'}")
        quota, barrier, outcomes = quotas.Quota(max_bytes=None, max_count=3), threading.Barrier(8), []

        def add(index: int) -> None:
            barrier.wait()
            try:
                store.uploads.add_weights(quota, name=f"w{index}", size=10, sha256="0" * 64, owner="alice",
                                          tensors=1, params=1)
                outcomes.append("stored")
            except quotas.QuotaExceeded:
                outcomes.append("refused")

        threads = [threading.Thread(target=add, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["refused"] * 5 + ["stored"] * 3
        assert len(store.uploads.list_weights("alice")) == 3
        store.engine.dispose()
    print(f"\nreliability: quota race ({database}): 8 concurrent uploads under a count quota of 3: "
          f"{outcomes.count('stored')} stored, {outcomes.count('refused')} refused (413)")
