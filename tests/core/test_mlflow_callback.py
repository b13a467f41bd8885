"""The MLflow callback's parts that need no server: the JobSpec's tracking field, which target a job
logs to, the JobSpec flattened into params, and the sender that keeps MLflow off the training thread
(retries with backoff, then one warning and nothing more)."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from rigl_core.integrations.mlflow import Sender, flatten, resolve_target, run_files, shown_uri
from rigl_core.spec import JobSpec

BASE = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}}


def test_the_tracking_field_takes_a_uri_a_mapping_or_a_switch():
    assert JobSpec.model_validate({**BASE, "tracking": {"mlflow": "http://mlflow:5000"}}).tracking.mlflow.uri \
        == "http://mlflow:5000"
    assert JobSpec.model_validate({**BASE, "tracking": {"mlflow": {"experiment": "x"}}}).tracking.mlflow.experiment \
        == "x"
    assert JobSpec.model_validate({**BASE, "tracking": {"mlflow": False}}).tracking.mlflow.enabled is False
    assert JobSpec.model_validate(BASE).tracking is None
    with pytest.raises(ValidationError, match="tracking.mlflow.uri"):
        JobSpec.model_validate({**BASE, "tracking": {"mlflow": "ftp://host"}})
    with pytest.raises(ValidationError, match="tracking.mlflow.colour"):
        JobSpec.model_validate({**BASE, "tracking": {"mlflow": {"colour": "red"}}})


def test_the_job_s_tracking_wins_over_the_deployment_s():
    assert resolve_target(None, None) is None
    assert resolve_target(None, "http://a") == resolve_target({"mlflow": None}, "http://a")
    assert resolve_target(None, "http://a", "team").uri == "http://a"
    assert resolve_target(None, "http://a", "team").experiment == "team"
    job = {"mlflow": {"uri": "http://b", "experiment": "mine", "run_name": "r", "enabled": True}}
    target = resolve_target(job, "http://a", "team", run_name="job_x")
    assert (target.uri, target.experiment, target.run_name) == ("http://b", "mine", "r")
    assert resolve_target({"mlflow": {"enabled": False}}, "http://a") is None
    assert resolve_target({"mlflow": {"experiment": "mine", "enabled": True}}, None) is None  # no URI anywhere
    assert shown_uri("https://user:secret@mlflow.example:5000/x") == "https://mlflow.example:5000/x"


def test_a_jobspec_flattens_into_mlflow_params():
    spec = JobSpec.model_validate({**BASE, "model": {"name": "mlp", "hidden_sizes": [32, 16]}})
    params = flatten(spec.model_dump(mode="json", exclude={"tracking"}))
    assert params["sparsity.method"] == "rigl" and params["sparsity.schedule.alpha"] == "0.3"
    assert params["model.hidden_sizes"] == "[32, 16]" and params["training.lr"] == "0.1"
    assert params["sparsity.layer_density"] == "{}" and params["model.num_classes"] == "None"
    assert all(isinstance(v, str) and len(v) <= 6000 for v in params.values())
    assert len(flatten({"a": {"b": "x" * 10_000}})["a.b"]) == 6000


def test_run_files_put_the_report_on_top_exports_below_and_the_onnx_model_aside(tmp_path):
    names = ["report.json", "model.safetensors", "model.packed.safetensors", "model.onnx"]
    files, onnx, extra = run_files(tmp_path / n for n in names)
    assert files == [(tmp_path / "report.json", ""), *((tmp_path / n, "exports") for n in names[1:])]
    assert onnx == tmp_path / "model.onnx" and extra == [tmp_path / "model.packed.safetensors"]
    assert run_files([tmp_path / "report.json"])[1:] == (None, [])


def test_the_sender_retries_with_backoff_and_then_warns_once_and_stops():
    sender = Sender(retries=3, backoff=0.01)
    sender.start()
    tries, done = [], []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError("refused")
        done.append("flaky")

    sender.submit("first", flaky)
    sender.submit("second", lambda: (_ for _ in ()).throw(ConnectionError("connection refused\nmore")))
    sender.submit("third", lambda: done.append("third"))
    assert sender.close(timeout=30)
    assert done == ["flaky"] and len(tries) == 3  # succeeded on its third try; "third" came after the failure
    assert sender.take_warnings() == ["MLflow logging stopped: second failed 3 times (connection refused)"]
    assert sender.take_warnings() == [] and sender.dropped == 1


def test_close_gives_up_after_its_timeout_without_blocking_on_a_hung_call():
    sender = Sender(retries=1)
    sender.start()
    release = threading.Event()
    sender.submit("hung", release.wait)
    assert sender.close(timeout=0.2) is False
    release.set()
