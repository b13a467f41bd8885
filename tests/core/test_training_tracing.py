"""The Trainer's OpenTelemetry spans (rigl_core/integrations/tracing.py): one per epoch, one per mask update
under its epoch, in a process that configured OpenTelemetry; none (and no tracer) otherwise."""

from __future__ import annotations

import pytest

from helpers.specs import small_spec

pytest.importorskip("opentelemetry.sdk.trace", reason="the 'otel' extra")


class Updates:
    """Records the steps of the mask updates the Trainer reports to its callbacks."""

    def __init__(self):
        self.steps: list[int] = []

    def on_step(self, trainer, metrics): ...

    def on_eval(self, trainer, metrics): ...

    def on_mask_update(self, trainer, update):
        self.steps.append(update.step)

    def should_stop(self, trainer):
        return False


def test_epochs_and_mask_updates_are_spans_under_the_current_span():
    from opentelemetry import trace

    from helpers.tracing import memory_spans
    from rigl_core.training.trainer import Trainer

    updates = Updates()
    with memory_spans() as exporter:
        trainer = Trainer(small_spec(training__epochs=3), callbacks=[updates])
        with trace.get_tracer("test").start_as_current_span("job"):
            trainer.fit()
        spans = exporter.get_finished_spans()
    job = next(s for s in spans if s.name == "job")
    epochs = [s for s in spans if s.name == "epoch"]
    masks = [s for s in spans if s.name == "mask_update"]
    assert [e.attributes["rigl.epoch"] for e in epochs] == [1, 2, 3]
    assert all(e.parent.span_id == job.context.span_id for e in epochs)
    assert [e.attributes["rigl.step.start"] for e in epochs] == [0] + [e.attributes["rigl.step.end"] for e in epochs[:-1]]
    assert epochs[-1].attributes["rigl.step.end"] == trainer.total_steps
    assert "rigl.val_accuracy" in epochs[-1].attributes
    assert [m.attributes["rigl.step"] for m in masks] == updates.steps and updates.steps
    epoch_of = {e.context.span_id: e for e in epochs}
    for mask in masks:
        epoch = epoch_of[mask.parent.span_id]
        assert epoch.attributes["rigl.step.start"] <= mask.attributes["rigl.step"] < epoch.attributes["rigl.step.end"]
        assert epoch.start_time <= mask.start_time <= mask.end_time <= epoch.end_time


def test_without_a_configured_provider_the_trainer_has_no_tracer():
    from rigl_core.integrations.tracing import training_tracer
    from rigl_core.training.trainer import Trainer

    assert training_tracer() is None  # the API's default (proxy) provider: nothing configured
    trainer = Trainer(small_spec(training__epochs=1))
    trainer.fit()
    assert trainer.tracer is None
