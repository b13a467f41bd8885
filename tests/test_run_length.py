"""One rule for how long a job trains (rigl_core.data.epochs), shared by the Trainer and the API."""

from __future__ import annotations

import subprocess
import sys

from api.costs import planned_steps
from rigl_core.data.batches import BatchPlan
from rigl_core.data.epochs import steps_per_epoch, total_steps
from rigl_core.spec import JobSpec


def _spec(**training) -> JobSpec:
    return JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "training": training})


def test_the_api_plans_the_steps_a_multi_device_accumulating_job_makes():
    # 1030 samples, batch 256 over 2 devices × 8 micro-batches: the 6-sample tail cannot give each of the
    # 16 micro-batches a sample, so every rank drops it: 4 steps an epoch (the old ceil said 5).
    spec = _spec(epochs=3, batch_size=256, devices=2, accumulate_steps=8)
    ranks = [BatchPlan(1030, 256, 0, world_size=2, rank=r, accumulate_steps=8) for r in range(2)]
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
    code = ("import sys\nimport api.costs, rigl_core.data.epochs\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
