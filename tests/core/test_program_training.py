"""Every training path a built-in model has, for a `torch.export` program: each method, reduced
precision, several devices (DDP on CPU), torch.compile, channels_last, and resuming from a checkpoint.
Slow: each trains a few steps through the real Trainer."""

from __future__ import annotations

import pytest
import torch

from helpers.programs import DIGITS, SmallCNN, export
from rigl_core.spec import JobSpec
from rigl_core.training.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return export(SmallCNN(), DIGITS, tmp_path_factory.mktemp("program") / "cnn.pt2")


def spec(program, sparsity: dict | None = None, **training) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"program": str(program)}, "dataset": {"name": "digits"},
        "sparsity": {"method": "rigl", "sparsity": 0.8, **(sparsity or {})},
        "training": {"epochs": 1, "max_steps": 6, "batch_size": 32, "device": "cpu", **training}})


@pytest.mark.parametrize("method", ["dense", "static", "set", "snfs", "rigl", "srigl", "gmp", "snip"])
def test_every_method_trains_a_program(program, method):
    report = Trainer(spec(program, {"method": method})).fit()
    assert report["completed"] and report["leak_check"]["ok"]
    masked = [row for row in report["layers"] if row["masked"]]
    assert (not masked) if method == "dense" else {row["name"] for row in masked} <= {"conv", "fc", "head"}


@pytest.mark.parametrize("training", [{"precision": "bf16"}, {"devices": 2}, {"compile": True},
                                      {"channels_last": True}], ids=["bf16", "two-devices", "compile", "channels-last"])
def test_precision_devices_compile_and_memory_format(program, training):
    report = Trainer(spec(program, **training)).fit()
    assert report["completed"] and report["leak_check"]["ok"]
    assert report["devices"] == training.get("devices", 1)


def test_resumes_bitwise_from_a_checkpoint(program, tmp_path):
    straight = Trainer(spec(program))
    straight.fit()

    class StopAt3(__import__("rigl_core.training.trainer", fromlist=["Callback"]).Callback):
        def should_stop(self, trainer):
            return trainer.step >= 3

    first = Trainer(spec(program), callbacks=[StopAt3()])
    first.fit()
    first.save_checkpoint(tmp_path / "resume.pt")
    resumed = Trainer(spec(program))
    resumed.load_checkpoint(tmp_path / "resume.pt")
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
