"""Warm starts through the service (issue 13 item 4): uploaded weights (`w_…`) and `init_from_job`.

The real API in process with keys on (SQLite, and PostgreSQL when it runs here), and the real worker
runner in process for the jobs that must run; nothing is mocked.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save, save_file

from store.settings import Settings

MODEL = {"name": "mlp", "hidden_sizes": [64, 32]}
DENSE = {"model": MODEL, "dataset": {"name": "digits"}, "sparsity": {"method": "dense"},
         "training": {"epochs": 6, "batch_size": 64, "lr": 0.1}}
# a tiny learning rate: the job ends where it started, so its accuracy is the warm start's
PRUNE = {"model": MODEL, "dataset": {"name": "digits"},
         "sparsity": {"method": "rigl", "sparsity": 0.8, "init": "magnitude"},
         "training": {"epochs": 1, "max_steps": 2, "batch_size": 64, "lr": 1e-9}}


@pytest.fixture(params=["sqlite", "postgresql"])
def service(tmp_path, request):
    from contextlib import nullcontext

    from api.app import create_app
    from helpers.service import postgres_available, temporary_postgres_database
    from store.jobs import JobStore
    from store.keys import create_key

    if request.param == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL here")
    database = temporary_postgres_database() if request.param == "postgresql" else nullcontext(None)
    with database as url:
        settings = Settings(data_dir=tmp_path, database_url=url, auth=True, max_weights_bytes=2_000_000).resolved()
        store = JobStore(settings.database_url)
        keys = {owner: create_key(store, owner)[1] for owner in ("alice", "bob")}
        with TestClient(create_app(settings, enqueue=lambda job_id: None, reaper=False)) as client:
            client.headers_of = {owner: {"Authorization": f"Bearer {key}"} for owner, key in keys.items()}
            client.settings, client.store = settings, store
            yield client
        store.engine.dispose()


def mlp_state(hidden=(64, 32)) -> dict[str, torch.Tensor]:
    from rigl_core.models.registry import build_model

    return build_model("mlp", 10, [1, 8, 8], list(hidden)).state_dict()


def upload(service, owner: str, data: bytes, name: str = "mine"):
    return service.post("/v1/weights", params={"name": name}, content=data, headers=service.headers_of[owner])


def submit(service, owner: str, body: dict):
    return service.post("/v1/jobs", json=body, headers=service.headers_of[owner])


def test_upload_gives_an_id_only_its_owner_can_see_and_use(service):
    response = upload(service, "alice", save(mlp_state()))
    assert response.status_code == 201, response.text
    weights = response.json()
    assert weights["id"].startswith("w_") and len(weights["id"]) == 22
    assert weights["tensors"] == len(mlp_state()) and weights["params"] == sum(v.numel() for v in mlp_state().values())
    alice, bob = service.headers_of["alice"], service.headers_of["bob"]
    assert [w["id"] for w in service.get("/v1/weights", headers=alice).json()["data"]] == [weights["id"]]
    assert service.get("/v1/weights", headers=bob).json()["data"] == []
    assert service.get(f"/v1/weights/{weights['id']}", headers=bob).status_code == 404
    body = {**PRUNE, "model": {**MODEL, "weights": weights["id"]}}
    assert submit(service, "alice", body).status_code == 201
    foreign = submit(service, "bob", body)
    assert foreign.status_code == 422 and foreign.json()["error"]["field"] == "model.weights"
    assert weights["id"] in foreign.json()["error"]["message"]


@pytest.mark.parametrize("what", ["pickle", "torch.save", "text", "empty", "nan", "truncated", "too large"])
def test_anything_but_a_finite_safetensors_state_dict_is_refused(service, tmp_path, what):
    state = mlp_state()
    if what == "torch.save":
        torch.save(state, tmp_path / "m.pt")
        data = (tmp_path / "m.pt").read_bytes()
    else:
        data = {"pickle": lambda: pickle.dumps({k: v.numpy() for k, v in state.items()}),
                "text": lambda: b"hello, I am not a tensor file at all",
                "empty": lambda: b"",
                "nan": lambda: save({**state, "fc1.weight": torch.full_like(state["fc1.weight"], float("nan"))}),
                "truncated": lambda: save(state)[:-10],
                "too large": lambda: save({"w": torch.zeros(600_000)})}[what]()
    response = upload(service, "alice", data)
    assert response.status_code == (413 if what == "too large" else 422), response.text
    error = response.json()["error"]
    assert error["field"] == "body", error
    assert service.get("/v1/weights", headers=service.headers_of["alice"]).json()["data"] == []
    assert list((service.settings.artifact_dir / "weights").iterdir()) == []  # no temp file left either


def test_jobs_naming_missing_or_mismatched_weights_get_422_naming_model_weights(service):
    wide = upload(service, "alice", save(mlp_state(hidden=(64, 16)))).json()["id"]
    renamed = upload(service, "alice", save({("head." + k if k.startswith("fc3") else k): v
                                             for k, v in mlp_state().items()})).json()["id"]
    cases = {
        wide: "'fc2.weight' has shape [16, 64] but the model's is [32, 64]",
        renamed: "missing 'fc3.weight'",
        "w_00000000000000000000": "no uploaded weights",
        "/etc/passwd": "give the id (w_…)",
        str(service.settings.artifact_dir / "weights" / "x.safetensors"): "give the id (w_…)",
    }
    for weights, expected in cases.items():
        response = submit(service, "alice", {**PRUNE, "model": {**MODEL, "weights": weights}})
        assert response.status_code == 422, (weights, response.text)
        error = response.json()["error"]
        assert error["field"] == "model.weights" and expected in error["message"], (weights, error)
        assert str(service.settings.artifact_dir) not in response.text


def test_magnitude_init_without_weights_or_with_gmp_is_a_422_naming_sparsity_init(service):
    response = submit(service, "alice", {**PRUNE, "model": MODEL})
    assert response.status_code == 422 and response.json()["error"]["field"] == "sparsity.init"
    assert "model.weights" in response.json()["error"]["message"]
    weights = upload(service, "alice", save(mlp_state())).json()["id"]
    gmp = submit(service, "alice", {**PRUNE, "model": {**MODEL, "weights": weights},
                                    "sparsity": {"method": "gmp", "init": "magnitude"}})
    assert gmp.status_code == 422 and gmp.json()["error"]["field"] == "sparsity.init", gmp.text
    from_dense = submit(service, "alice", {**PRUNE, "model": {**MODEL, "weights": weights},
                                           "sparsity": {"method": "gmp"}})
    assert from_dense.status_code == 201, from_dense.text


def test_the_worker_refuses_a_stored_spec_whose_weights_lie_outside_the_uploads(service, tmp_path):
    from worker.runner import run_job

    outside = tmp_path / "elsewhere.safetensors"
    save_file(mlp_state(), str(outside))
    body = {**PRUNE, "model": {**MODEL, "weights": str(outside)}}
    job = service.store.create_job(body, body, 2, owner="alice")
    assert run_job(job.id, service.settings, service.store) == "failed"
    error = service.get(f"/v1/jobs/{job.id}", headers=service.headers_of["alice"]).json()["error"]
    assert error["code"] == "invalid_job" and error["message"].startswith("model.weights: not an uploaded")


def test_init_from_job_starts_from_a_succeeded_jobs_export(service):
    from worker.runner import run_job

    dense = submit(service, "alice", DENSE).json()["id"]
    early = submit(service, "alice", {**PRUNE, "model": {**MODEL, "init_from_job": dense}})
    assert early.status_code == 422 and early.json()["error"]["field"] == "model.init_from_job"
    assert "queued" in early.json()["error"]["message"]
    assert run_job(dense, service.settings, service.store) == "succeeded"
    dense_metrics = service.get(f"/v1/jobs/{dense}", headers=service.headers_of["alice"]).json()["metrics"]
    assert dense_metrics["val_accuracy"] > 0.9, dense_metrics

    foreign = submit(service, "bob", {**PRUNE, "model": {**MODEL, "init_from_job": dense}})
    assert foreign.status_code == 422 and foreign.json()["error"]["field"] == "model.init_from_job"
    other_model = submit(service, "alice", {**PRUNE, "model": {"name": "mlp", "hidden_sizes": [64, 16],
                                                               "init_from_job": dense}})
    assert other_model.status_code == 422 and other_model.json()["error"]["field"] == "model.init_from_job"
    assert "fc2.weight" in other_model.json()["error"]["message"]

    response = submit(service, "alice", {**PRUNE, "model": {**MODEL, "init_from_job": dense}})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["spec"]["model"]["init_from_job"] == dense  # the user's spec; the worker gets the file
    assert run_job(job["id"], service.settings, service.store) == "succeeded"
    pruned = service.get(f"/v1/jobs/{job['id']}", headers=service.headers_of["alice"]).json()
    assert pruned["metrics"]["val_accuracy"] > 0.6, pruned["metrics"]  # random sparse init: ~0.1
    report = service.get(f"/v1/jobs/{job['id']}/sparsity", headers=service.headers_of["alice"]).json()
    assert report["totals"]["sparsity"] == pytest.approx(0.8, abs=0.01), report["totals"]


def test_an_interrupted_weights_upload_leaves_nothing_behind_after_a_restart(service):
    import os

    folder = service.settings.artifact_dir / "weights"
    folder.mkdir(exist_ok=True)
    stale = folder / ".upload-0123.safetensors"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    from store.artifacts import Artifacts

    assert Artifacts(service.settings.artifact_dir).remove_orphan_uploads(600) == 1
    assert not stale.exists()


def test_weights_in_use_cannot_be_deleted_and_deleted_weights_cannot_be_used(service):
    from store.jobs import UploadGone

    alice, bob = service.headers_of["alice"], service.headers_of["bob"]
    weights = upload(service, "alice", save(mlp_state())).json()["id"]
    path = service.settings.artifact_dir / "weights" / f"{weights}.safetensors"
    assert path.is_file()
    job = submit(service, "alice", {**PRUNE, "model": {**MODEL, "weights": weights}}).json()["id"]
    assert service.delete(f"/v1/weights/{weights}", headers=bob).status_code == 404
    busy = service.delete(f"/v1/weights/{weights}", headers=alice)
    assert busy.status_code == 409 and job in busy.json()["error"]["message"]
    assert service.post(f"/v1/jobs/{job}/cancel", headers=alice).json()["status"] == "cancelled"  # was queued
    assert service.delete(f"/v1/weights/{weights}", headers=alice).json()["deleted"] is True
    assert not path.exists() and service.get(f"/v1/weights/{weights}", headers=alice).status_code == 404
    again = submit(service, "alice", {**PRUNE, "model": {**MODEL, "weights": weights}})
    assert again.status_code == 422 and again.json()["error"]["field"] == "model.weights"
    with pytest.raises(UploadGone) as gone:  # a submission that resolved them just before the delete
        service.store.create_job({}, {}, 1, owner="alice", weights_id=weights)
    assert gone.value.field == "model.weights"
