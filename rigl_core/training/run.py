"""Run one job into an output directory: metrics.jsonl, spec.json, then the report and every export
(rigl_core/export/pipeline.py: the same writer the service's worker uses for its outputs).

Used by `rigl train`. The service's worker runs the same Trainer with its own callbacks, and its own
claim, resume and lease handling around it (worker/runner.py), so it does not call `run_training`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from rigl_core.export.pipeline import TrainedRun, write_outputs
from rigl_core.sparse.updates import MaskUpdate
from rigl_core.spec import JobSpec
from rigl_core.training.trainer import Callback, Trainer

METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"


class JsonlMetrics(Callback):
    """Appends one JSON line per logged step, evaluation and mask update."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def on_step(self, trainer, metrics):
        self._write({"type": "train", **metrics})

    def on_eval(self, trainer, metrics):
        self._write({"type": "eval", **metrics})

    def on_mask_update(self, trainer, update: MaskUpdate):
        self._write({"type": "mask_update", **update.to_dict()})

    def close(self) -> None:
        self.file.close()


class PeriodicCheckpoint(Callback):
    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def on_step(self, trainer, metrics):
        pass

    def should_stop(self, trainer) -> bool:
        if self.every and trainer.step % self.every == 0 and trainer.step < trainer.total_steps:
            trainer.save_checkpoint(self.path)
        return False


def run_training(
    spec: JobSpec,
    out_dir: str | os.PathLike,
    progress: bool = False,
    checkpoint_every: int = 0,
    resume: str | os.PathLike | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train `spec`, write all outputs into `out_dir` and return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = JsonlMetrics(out / METRICS)
    all_callbacks = [metrics, *callbacks]
    if checkpoint_every:
        all_callbacks.append(PeriodicCheckpoint(out / CHECKPOINT, checkpoint_every))
    try:
        trainer = Trainer(spec, callbacks=all_callbacks, progress=progress)
        if resume is not None:
            trainer.load_checkpoint(resume)
        (out / "spec.json").write_text(spec.model_dump_json(indent=2))
        report = trainer.fit()
    finally:
        metrics.close()
    if trainer.stopped_early:
        trainer.save_checkpoint(out / CHECKPOINT)
    report["spec"] = spec.model_dump(mode="json")
    list(write_outputs(TrainedRun.of(trainer, report), out))  # the report, then every export
    return report
