"""Run one job into an output directory: report.json, metrics.jsonl, model.safetensors, packed, compressed
and ONNX exports.

Used by `rigl train`; the service worker calls the same function with its own callbacks.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from rigl_core.export.packed import extra_exports, save_dense, save_packed
from rigl_core.sparse.updates import MaskUpdate
from rigl_core.spec import JobSpec
from rigl_core.training.trainer import Callback, Trainer

REPORT = "report.json"
METRICS = "metrics.jsonl"
DENSE_EXPORT = "model.safetensors"
PACKED_EXPORT = "model.packed.safetensors"
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


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


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
    write_json(out / REPORT, report)
    save_dense(trainer.model, out / DENSE_EXPORT)
    values = spec.export.values
    save_packed(trainer.model, trainer.sparsifier.masks, out / PACKED_EXPORT, values)
    for kind, name, write, optional in extra_exports(trainer.model, trainer.sparsifier.masks, trainer.input_shape,
                                                     values):
        try:
            write(out / name)
        except Exception as error:  # noqa: BLE001 - an optional export never fails the run
            if not optional:
                raise
            warnings.warn(f"{kind} export skipped: {str(error).splitlines()[0] if str(error) else error!r}",
                          stacklevel=2)
    return report
