"""`training.devices: 2` on CPU: one job as two DistributedDataParallel processes (gloo).

Two ranks that each train on half of every global batch must end where one process training on the
whole batch ends: the same masks and weights within float rounding. Through `rigl train`, through
the library with a stop and an exact resume, and through a service job.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.specs import small_spec
from safetensors.torch import load_file
from helpers.service import ROOT

from rigl_core.training.trainer import Callback, Trainer

pytestmark = pytest.mark.slow


def _cli_train(out, devices: int) -> dict:
    command = [sys.executable, "-m", "rigl_core.cli", "train", "--model", "mlp", "--hidden-sizes", "64,32",
               "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--delta-t", "5", "--device", "cpu",
               "--devices", str(devices), "--out", str(out), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "report.json").read_text())


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: different masks"
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rigl_train_two_ranks_match_one_process(tmp_path):
    one = _cli_train(tmp_path / "one", 1)
    two = _cli_train(tmp_path / "two", 2)
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["steps"] == one["steps"] and two["leak_check"]["ok"]
    assert two["final_metrics"]["val_accuracy"] == pytest.approx(one["final_metrics"]["val_accuracy"], abs=1e-9)
    assert_same_model(load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors"))
    # rank 0 alone writes: one metrics line per logged step and evaluation, as a single process does
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert len(lines[0]) == len(lines[1])
    updates = [[json.loads(line) for line in run if '"mask_update"' in line] for run in lines]
    assert [u["step"] for u in updates[0]] == [u["step"] for u in updates[1]] != []


class StopAt(Callback):
    def __init__(self, step: int):
        self.at = step

    def should_stop(self, trainer):
        return trainer.step == self.at


def test_two_ranks_stop_together_and_resume_exactly(tmp_path):
    """Rank 0's callback stops both ranks at one step; both resume from rank 0's checkpoint and finish
    exactly where an uninterrupted two-rank run does."""
    spec = small_spec(training__device="cpu", training__devices=2)
    threads = torch.get_num_threads()
    first = Trainer(spec, callbacks=[StopAt(17)])
    report = first.fit()
    assert first.stopped_early and report["steps"] == 17
    first.save_checkpoint(tmp_path / "ck.pt")
    resumed = Trainer(spec)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    resumed.fit()
    straight = Trainer(spec)
    straight.fit()
    assert resumed.step == straight.step == straight.total_steps
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, mask in straight.sparsifier.masks.items():
        assert torch.equal(mask, resumed.sparsifier.masks[name])
    assert torch.get_num_threads() == threads  # rank 0 gave back the cores it shared with rank 1


def test_a_rank_that_dies_fails_the_job_naming_it():
    import signal

    class KillRankOne(Callback):
        def should_stop(self, trainer):
            if trainer.step == 5:
                trainer.group.children[0].send_signal(signal.SIGKILL)
            return False

    trainer = Trainer(small_spec(training__device="cpu", training__devices=2), callbacks=[KillRankOne()])
    with pytest.raises(RuntimeError, match=r"^training.devices: rank 1 exited with code -9"):
        trainer.fit()
    assert trainer.group is None


def test_a_two_device_service_job_matches_one_process(tmp_path):
    """Submitted to `rigl serve` (its real Celery worker owns 2 CPU "devices"): the job trains as two gloo
    ranks and its checkpoint holds the masks and weights of the one-process run of the same spec."""
    from rigl_core.client import Client
    from helpers.service import embedded_service

    job = {"model": {"name": "mlp", "hidden_sizes": [64, 32]}, "dataset": {"name": "digits"},
           "sparsity": {"method": "rigl", "sparsity": 0.9, "schedule": {"delta_t": 5}},
           "training": {"epochs": 2, "batch_size": 64, "lr": 0.1, "device": "cpu", "devices": 2,
                        "log_every_steps": 5}}
    with embedded_service(tmp_path / "data", tmp_path / "serve.log", RIGL_WORKER_DEVICES="2") as url:
        with Client(url) as client:
            submitted = client.submit(job)
            done = submitted.wait(timeout=240)
            assert done.status == "succeeded", (done, (tmp_path / "serve.log").read_text()[-3000:])
            served = load_file(submitted.download(format="dense", path=tmp_path / "served.safetensors"))
            report = submitted.report()
    assert done.result["devices"] == 2 and done.result["accumulate_steps"] == 1 and report["leak_check"]["ok"]
    local = Trainer(small_spec(training__device="cpu"))
    local.fit()
    assert_same_model({k: v.contiguous() for k, v in local.model.state_dict().items()}, served)
