"""Uploading a `torch.export` program as an architecture (`POST /v1/architectures/program`) and training it.

The real API in process (SQLite), the real worker runner in process for the job that runs; nothing is
mocked. Every hostile archive is answered 422 `invalid_program` naming its reason, and nothing from it
runs; a valid program is recorded with its shapes and maskable layers, trains as `model.program`, and
its dense export loads into the user's class.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from helpers.programs import DIGITS, HOSTILE, SmallCNN, export

JOB = {"dataset": {"name": "digits"}, "sparsity": {"method": "rigl", "sparsity": 0.8},
       "training": {"epochs": 1, "max_steps": 4, "batch_size": 32}}


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    torch.manual_seed(0)
    return export(SmallCNN(), DIGITS, tmp_path_factory.mktemp("program") / "cnn.pt2")


def upload(api, data: bytes, name: str = "cnn"):
    return api.post("/v1/architectures/program", params={"name": name}, content=data)


def test_upload_records_the_program_and_a_job_trains_it(api, program_file):
    from worker.runner import run_job

    response = upload(api, program_file.read_bytes())
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("arch_") and body["kind"] == "program"
    assert body["program"]["input_shape"] == DIGITS and body["program"]["num_classes"] == 10
    assert body["program"]["kernels"] == ["conv", "fc", "head"]
    assert body["params"] == sum(p.numel() for p in SmallCNN().parameters())
    assert [a["id"] for a in api.get("/v1/architectures").json()["data"]] == [body["id"]]
    assert (api.settings.artifact_dir / "programs" / f"{body['id']}.pt2").read_bytes() == program_file.read_bytes()

    job = api.post("/v1/jobs", json={**JOB, "model": {"program": body["id"]}})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert api.store.get_job(job_id).resolved_spec["model"]["program"] == f"programs/{body['id']}.pt2"
    plan = api.get(f"/v1/jobs/{job_id}/sparsity").json()
    assert [row["name"] for row in plan["layers"]] == ["conv", "fc", "head"]
    assert run_job(job_id, api.settings, api.store) == "succeeded"
    dense = api.get(f"/v1/jobs/{job_id}/checkpoint", params={"format": "dense"})
    trained = SmallCNN()
    trained.load_state_dict(load(dense.content))  # the user's own class, strict
    assert api.delete(f"/v1/architectures/{body['id']}").status_code == 200
    assert not (api.settings.artifact_dir / "programs" / f"{body['id']}.pt2").exists()


def test_a_dataset_of_another_shape_is_refused_naming_both(api, program_file):
    arch = upload(api, program_file.read_bytes()).json()["id"]
    other = {**JOB, "model": {"program": arch},
             "dataset": {"name": "synthetic", "input_shape": [3, 8, 8], "num_samples": 64}}
    response = api.post("/v1/jobs", json=other)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "model.program"
    assert "[1, 8, 8]" in error["message"] and "[3, 8, 8]" in error["message"]
    plan = api.post("/v1/plan", json={"model": {"program": arch}, "sparsity": {"sparsity": 0.9}})
    assert plan.status_code == 200 and plan.json()["input_shape"] == DIGITS


def test_references_are_checked(api, program_file):
    arch = upload(api, program_file.read_bytes()).json()["id"]
    layers = api.post("/v1/architectures", json={"name": "mlp", "architecture": {
        "input_shape": [4], "layers": [{"type": "linear", "out_features": 2}]}}).json()["id"]
    assert api.post("/v1/jobs", json={**JOB, "model": {"program": layers}}).json()["error"]["field"] == "model.program"
    by_name = api.post("/v1/jobs", json={**JOB, "model": {"name": arch}})
    assert by_name.status_code == 422 and "model.program" in by_name.json()["error"]["message"]
    plan = api.post("/v1/plan", json={"model": {"name": arch}})
    assert plan.status_code == 422 and plan.json()["error"]["field"] == "model.name"
    path = api.post("/v1/jobs", json={**JOB, "model": {"program": "/etc/passwd"}})
    assert path.status_code == 422 and path.json()["error"]["field"] == "model.program"
    job_id = api.post("/v1/jobs", json={**JOB, "model": {"program": arch}}).json()["id"]
    assert api.delete(f"/v1/architectures/{arch}").status_code == 409  # a queued job reads it
    assert job_id in api.delete(f"/v1/architectures/{arch}").json()["error"]["message"]


@pytest.mark.parametrize("name, build, reason", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_archives_are_refused_naming_the_reason(api, program_file, tmp_path, name, build, reason):
    marker = tmp_path / "payload-ran"
    response = upload(api, build(program_file, tmp_path / f"{name}.pt2", marker).read_bytes())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_program" and error["field"] == "body" and reason in error["message"]
    assert not marker.exists()
    assert api.get("/v1/architectures").json()["data"] == []
    assert not list((api.settings.artifact_dir / "programs").iterdir())  # the temp file went too


def test_a_static_batch_is_refused_with_how_to_export(api, tmp_path):
    response = upload(api, export(SmallCNN(), DIGITS, tmp_path / "static.pt2", dynamic=False).read_bytes())
    assert response.status_code == 422
    assert "torch.export.Dim('batch')" in response.json()["error"]["message"]


def test_size_caps(make_api, program_file):
    small = make_api(max_program_bytes=1000)
    assert upload(small, program_file.read_bytes()).status_code == 413
    tight = make_api(max_upload_inflated_bytes=10_000)
    response = tight.post("/v1/architectures/program", params={"name": "x"}, content=program_file.read_bytes())
    assert response.status_code == 422 and "inflates to" in response.json()["error"]["message"]
    few = make_api(max_params=100)
    response = few.post("/v1/architectures/program", params={"name": "x"}, content=program_file.read_bytes())
    assert response.status_code == 422 and response.json()["error"]["code"] == "too_large"


def test_the_client_exports_and_uploads_in_one_call(api):
    """`Client.upload_program(model, example_inputs)`, over the in-process API (its TestClient as transport)."""
    from rigl_core.client import Client, InvalidRequest

    client = Client("http://testserver")
    client.http = api
    torch.manual_seed(0)
    model = SmallCNN()
    arch = client.upload_program(model, torch.randn(1, *DIGITS))  # one sample: exported as a batch of two
    assert arch["kind"] == "program" and arch["name"] == "SmallCNN" and arch["program"]["input_shape"] == DIGITS
    stored = api.settings.artifact_dir / "programs" / f"{arch['id']}.pt2"
    assert client.upload_program(stored, name="again")["program"] == {**arch["program"]}
    with pytest.raises(InvalidRequest, match="not a .pt2 archive"):
        client.upload_program(__file__)
