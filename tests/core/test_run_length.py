"""One rule for how long a job trains (rigl_core.data.epochs) and one for the validation split's size
(rigl_core.data.holdout), shared by the Trainer, the loaders and the API's submit-time checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from api.costs import planned_steps
from rigl_core.data.batches import BatchOrder
from rigl_core.data.describe import describe
from rigl_core.data.epochs import steps_per_epoch, total_steps
from rigl_core.data.holdout import training_size, validation_size
from rigl_core.data.registry import load_dataset
from rigl_core.spec import DatasetSpec, JobSpec


def _spec(**training) -> JobSpec:
    return JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "training": training})


def test_the_api_plans_the_steps_a_multi_device_accumulating_job_makes():
    # 1030 samples, batch 256 over 2 devices × 8 micro-batches: the 6-sample tail cannot give each of the
    # 16 micro-batches a sample, so every rank drops it: 4 steps an epoch (the old ceil said 5).
    spec = _spec(epochs=3, batch_size=256, devices=2, accumulate_steps=8)
    ranks = [BatchOrder(1030, 256, 0, world_size=2, rank=r, accumulate_steps=8) for r in range(2)]
    assert [plan.steps_per_epoch for plan in ranks] == [4, 4]
    assert planned_steps(spec, 1030) == 12 == total_steps(spec.training, 1030, 2)
    assert 3 * -(-1030 // 256) == 15  # what the API planned before


def test_auto_accumulation_is_planned_as_the_trainer_resolves_it():
    # batch 4096, ≤256 per device on 1 device: 16 micro-batches, so a tail of 15 samples is dropped.
    spec = _spec(epochs=2, batch_size=4096, accumulate_steps="auto", max_device_batch=256)
    assert planned_steps(spec, 4096 * 3 + 15) == 6
    assert planned_steps(spec, 4096 * 3 + 16) == 8


def test_a_single_micro_batch_counts_every_tail_and_max_steps_caps():
    assert steps_per_epoch(1437, 64) == 23 and steps_per_epoch(1408, 64) == 22
    assert steps_per_epoch(1437, 64, micro_batches=32) == 22  # a 29-sample tail, 32 micro-batches
    assert planned_steps(_spec(epochs=5, batch_size=64, max_steps=50), 1437) == 50
    assert planned_steps(_spec(epochs=2, batch_size=64, devices="all"), 1437) == 46  # unknown GPUs: an upper bound


def test_the_plan_is_torch_free():
    code = ("import sys\nimport api.costs, rigl_core.data.epochs, rigl_core.data.holdout, rigl_core.data.describe\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("total", "fraction", "held_out"), [(1797, 0.2, 359), (10, 0.01, 1), (5, 0.5, 2)])
def test_validation_size_rounds_and_holds_out_at_least_one(total, fraction, held_out):
    assert validation_size(total, fraction) == held_out
    assert training_size(total, fraction) == total - held_out


@pytest.mark.parametrize("dataset", [{"name": "digits", "val_fraction": 0.3},
                                     {"name": "synthetic", "num_samples": 101, "input_shape": [4], "val_fraction": 0.15}])
def test_submit_time_count_matches_what_the_loader_splits(dataset):
    spec = DatasetSpec.model_validate(dataset)
    data = load_dataset(spec)
    assert describe(spec).num_train == len(data.x_train) == training_size(len(data.x_train) + len(data.x_val),
                                                                           spec.val_fraction)
