"""`data_wait_share`: the share of training time spent waiting for data, per log line and for the run.

Time is a fake clock that only moves while the trainer waits for a batch (1 s each) or evaluates
(100 s each), so every share is exactly 1.0 — evaluation is never training time — and nothing
depends on the machine's speed."""

from __future__ import annotations

import time

import pytest
from helpers.specs import small_spec

from rigl_core.training.trainer import Callback, Trainer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Shares(Callback):
    def __init__(self):
        self.shares = []

    def on_step(self, trainer, metrics):
        self.shares.append((trainer.step, metrics["data_wait_share"]))


def test_data_wait_share_leaves_evaluation_out_and_never_exceeds_one(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    watch = Shares()
    # 1437 training digits at batch 64: 23 steps an epoch, so the log window of steps 21-30 holds an evaluation
    trainer = Trainer(small_spec(training__device="cpu", training__log_every_steps=10), callbacks=[watch])
    batches, evaluate = trainer.feed.train_steps, trainer.evaluate

    def slow_batches(*args, **kwargs):
        for micros in batches(*args, **kwargs):
            clock.now += 1.0
            yield micros

    def slow_evaluate():
        clock.now += 100.0
        return evaluate()

    trainer.feed.train_steps, trainer.evaluate = slow_batches, slow_evaluate
    report = trainer.fit()
    assert [step for step, _ in watch.shares] == [10, 20, 30, 40, 46]
    assert [share for _, share in watch.shares] == pytest.approx([1.0] * 5)
    assert report["data_wait_share"] == pytest.approx(1.0)
