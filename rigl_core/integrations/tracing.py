"""OpenTelemetry spans of the Trainer: one per epoch, one per mask update.

rigl_core requires no tracing package. A process that configured an OpenTelemetry SDK (the service's worker,
service_common/tracing.py; a library user's own application) gets the Trainer's epochs and mask updates as
spans under its current span (the worker's job span); any other process gets `training_tracer() is None`,
checked once per `fit`, and the loop pays nothing per step. This is rigl_core's one module that imports
opentelemetry, and only once a configured SDK has imported it already.

The Trainer seeds Python's `random` (runs are reproducible), from which the SDK's default id generator
draws: give your TracerProvider an `id_generator` of its own (the service's draws from the operating
system), or runs with the same seed repeat their span ids.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator


def training_tracer() -> "TrainingTracer | None":
    """A tracer when this process has a configured (SDK) tracer provider, else None."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # nobody configured OpenTelemetry here: don't import it
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return TrainingTracer(provider.get_tracer("rigl_core.training"))


class TrainingTracer:
    """Spans of one Trainer's fit (rank 0 only: the other ranks' processes have no provider)."""

    def __init__(self, tracer: Any):
        self.tracer = tracer

    @contextmanager
    def epoch(self, trainer) -> Iterator[None]:
        """The rest of the current epoch: its steps and its evaluation (a resumed run's first span starts
        mid-epoch, at `rigl.step.start`)."""
        evaluations = len(trainer.eval_history)
        with self.tracer.start_as_current_span(
                "epoch", attributes={"rigl.epoch": trainer.epoch + 1, "rigl.step.start": trainer.step}) as span:
            yield
            span.set_attribute("rigl.step.end", trainer.step)
            if len(trainer.eval_history) > evaluations:
                span.set_attributes({f"rigl.{key}": value for key, value in trainer.eval_history[-1].items()
                                     if key.startswith("val_") and isinstance(value, (int, float))})

    @staticmethod
    def now() -> int:
        return time.time_ns()

    def mask_update(self, update, started_ns: int) -> None:
        """A span from `started_ns` (before the step that made the update) to now."""
        span = self.tracer.start_span("mask_update", start_time=started_ns, attributes={
            "rigl.step": update.step, "rigl.drop_fraction": float(update.drop_fraction),
            "rigl.churn": float(update.churn), "rigl.layers": len(update.layers)})
        span.end()
