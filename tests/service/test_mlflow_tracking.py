"""Jobs as MLflow runs, against a real `mlflow server` (SQLite backend, local artifact root) started by the
test: the JobSpec as params, the per-step metrics and per-layer sparsity as metrics, the report and the
exports as artifacts, the run's tags, and `POST /v1/jobs/{id}/register` making the job's ONNX model a
registered model version with its lineage, loadable by MLflow's own pyfunc client."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.mlflow_server import mlflow_server
from helpers.service import JOB

mlflow = pytest.importorskip("mlflow")
# One worker runs the module: its MLflow server (the module fixture) starts once, not once per xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow-server")]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def test_a_job_is_an_mlflow_run_and_registers_as_a_model_version(make_api, tracking_uri):
    from mlflow.tracking import MlflowClient

    from worker.runner import run_job

    api = make_api(mlflow_tracking_uri=tracking_uri)
    body = {**JOB, "name": "digits-rigl", "tracking": {"mlflow": {"experiment": "team-x"}}}
    job_id = api.post("/v1/jobs", json=body).json()["id"]
    assert run_job(job_id, api.settings) == "succeeded"
    job = api.get(f"/v1/jobs/{job_id}").json()
    events = api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    assert [e for e in events if e["level"] == "warn"] == []

    client = MlflowClient(tracking_uri)
    run = client.get_run(job["result"]["mlflow"]["run_id"])
    assert job["result"]["mlflow"]["experiment"] == "team-x"
    assert client.get_experiment(run.info.experiment_id).name == "team-x"
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-rigl"
    tags, params = run.data.tags, run.data.params
    assert tags["rigl.job_id"] == job_id and tags["rigl.method"] == "rigl" and tags["rigl.sparsity"] == "0.9"
    assert tags["rigl.owner"] == "local"
    assert params["sparsity.method"] == "rigl" and params["training.epochs"] == "2"
    assert params["model.name"] == "mlp" and "sparsity.schedule.delta_t" in params and "tracking" not in params
    losses = client.get_metric_history(run.info.run_id, "loss")
    stored = [e for e in api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"] if e["type"] == "eval"]
    total = job["progress"]["total_steps"]
    assert [m.step for m in losses] == [*range(10, total + 1, 10), *([total] if total % 10 else [])]  # every logged step
    accuracy = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.value for m in accuracy] == pytest.approx([e["data"]["val_accuracy"] for e in stored])
    layers = {key for key in run.data.metrics if key.startswith("sparsity/")}
    assert layers and all(0.0 < run.data.metrics[key] < 1.0 for key in layers)
    assert run.data.metrics["final/sparsity"] == pytest.approx(job["result"]["sparsity"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "exports", "model"} <= artifacts
    exports = {a.path for a in client.list_artifacts(run.info.run_id, "exports")}
    assert {"exports/model.safetensors", "exports/model.packed.safetensors", "exports/model.onnx"} <= exports

    registered = api.post(f"/v1/jobs/{job_id}/register", json={"name": "digits-sparse"})
    assert registered.status_code == 201, registered.text
    version = registered.json()
    assert version["version"] == "1" and version["run_id"] == run.info.run_id
    stored_version = client.get_model_version("digits-sparse", "1")
    assert stored_version.tags["rigl.job_id"] == job_id and stored_version.tags["rigl.method"] == "rigl"
    assert stored_version.tags["rigl.dataset"] == "digits" and len(stored_version.tags["rigl.spec_sha256"]) == 64
    packed = next(c for c in api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"] if c["kind"] == "packed")
    assert stored_version.tags["rigl.packed_sha256"] == packed["sha256"]
    assert job_id in stored_version.description and '"method": "rigl"' in stored_version.description
    assert api.post(f"/v1/jobs/{job_id}/register", json={"name": "digits-sparse"}).json()["version"] == "2"

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/digits-sparse/1")  # MLflow's own client, no rigl_core
    outputs = model.predict(np.zeros((3, 1, 8, 8), dtype=np.float32))  # digits: 1×8×8
    assert np.asarray(outputs["output"]).shape == (3, 10)
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model")
    assert any(path.name == "model.packed.safetensors" for path in __import__("pathlib").Path(local).rglob("*"))


def test_a_resumed_job_continues_its_run(make_api, tracking_uri):
    import threading

    from mlflow.tracking import MlflowClient

    from worker.runner import run_job

    api = make_api(mlflow_tracking_uri=tracking_uri)
    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    stop = threading.Event()
    stop.set()  # as SIGTERM: checkpoint after the first step and requeue
    assert run_job(job_id, api.settings, stop_requested=stop) == "requeued"
    assert run_job(job_id, api.settings) == "succeeded"
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("rigl")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`rigl.job_id` = '{job_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == api.get(f"/v1/jobs/{job_id}").json()["result"]["mlflow"]["run_id"]


def test_rigl_serve_logs_its_jobs_and_rigl_register_registers_one(tracking_uri, tmp_path, capsys, monkeypatch):
    """The whole path through real processes: `rigl serve` (API and worker) with RIGL_MLFLOW_TRACKING_URI,
    `rigl submit --wait`, then the client CLI's `rigl register JOB NAME`."""
    import json

    from mlflow.tracking import MlflowClient

    from helpers.service import embedded_service
    from rigl_core.cli import main

    with embedded_service(tmp_path / "data", RIGL_MLFLOW_TRACKING_URI=tracking_uri) as url:
        monkeypatch.setenv("RIGL_API_URL", url)
        spec = tmp_path / "job.json"
        spec.write_text(json.dumps({**JOB, "training": {"epochs": 1, "batch_size": 64}}))
        assert main(["submit", str(spec), "--wait"]) == 0
        job_id = capsys.readouterr().out.split()[0]
        assert main(["register", job_id, "served-model", "--json"]) == 0
        version = json.loads(capsys.readouterr().out)
        assert main(["register", "job_0123456789abcdef0123", "served-model"]) == 2
        assert "no job" in capsys.readouterr().err
    assert version["name"] == "served-model" and version["job_id"] == job_id
    stored = MlflowClient(tracking_uri).get_model_version("served-model", version["version"])
    assert stored.tags["rigl.job_id"] == job_id and stored.run_id == version["run_id"]


def test_rigl_train_logs_a_local_run(tracking_uri, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from rigl_core.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "local-runs")
    assert main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    run_id = out.out.split("MLflow run ")[1].split()[0]
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["dataset.name"] == "digits"
    assert {a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id)} >= {"report.json", "exports", "model"}
