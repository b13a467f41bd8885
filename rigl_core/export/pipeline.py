"""The files a finished run is written as, in one place: the report, then each export format.

`OUTPUTS` is the registry (kind, file name, writer, optional): a new format is one entry. `rigl train`
(rigl_core/training/run.py) and the service's worker (worker/runner.py) both call `write_outputs` with
their output folder; the worker passes its own `put` (a temp file of its attempt, renamed into place
only while it holds the job's lease, then uploaded) and records a checkpoint row per export.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPORT = "report.json"
DENSE_EXPORT = "model.safetensors"
PACKED_EXPORT = "model.packed.safetensors"
COMPRESSED_EXPORT = "model.compressed.safetensors"
ONNX_EXPORT = "model.onnx"


@dataclass(frozen=True)
class TrainedRun:
    """What the writers read: the trained model, its masks, its input shape, the export precision, the report."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    input_shape: tuple | None
    values: str
    report: dict

    @classmethod
    def of(cls, trainer, report: dict) -> "TrainedRun":
        return cls(trainer.model, trainer.sparsifier.masks, trainer.input_shape, trainer.spec.export.values, report)


@dataclass(frozen=True)
class OutputFile:
    kind: str  # "report", or the export's kind in checkpoint rows ("dense", "packed", …)
    filename: str
    write: Callable[[TrainedRun, Path], object]
    optional: bool = False  # a failure is skipped with a note (the ONNX exporter can't trace every model)

    @property
    def is_export(self) -> bool:
        return self.kind != "report"


def _write_report(run: TrainedRun, path: Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(run.report, indent=2))
        f.flush()
        os.fsync(f.fileno())


def _write_dense(run: TrainedRun, path: Path) -> None:
    from rigl_core.export.packed import save_dense

    save_dense(run.model, path)


def _write_packed(run: TrainedRun, path: Path) -> None:
    from rigl_core.export.packed import save_packed

    save_packed(run.model, run.masks, path, run.values)


def _write_compressed(run: TrainedRun, path: Path) -> None:
    from rigl_core.export.packed import save_compressed_model

    save_compressed_model(run.model, run.masks, path, run.values)


def _write_onnx(run: TrainedRun, path: Path) -> None:
    from rigl_core.export.onnx import export_onnx

    export_onnx(run.model, run.input_shape, path)


OUTPUTS: tuple[OutputFile, ...] = (
    OutputFile("report", REPORT, _write_report),
    OutputFile("dense", DENSE_EXPORT, _write_dense),
    OutputFile("packed", PACKED_EXPORT, _write_packed),
    OutputFile("compressed", COMPRESSED_EXPORT, _write_compressed),
    OutputFile("onnx", ONNX_EXPORT, _write_onnx, optional=True),
)


def put_in_place(final: Path, write: Callable[[Path], object]) -> Path:
    """Write through a temp file and rename it into place: a reader never sees half a file."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    return final


def warn_skipped(output: OutputFile, error: Exception) -> None:
    warnings.warn(f"{output.kind} export skipped: {str(error).splitlines()[0] if str(error) else repr(error)}",
                  stacklevel=3)


def write_outputs(run: TrainedRun, out_dir: str | os.PathLike,
                  put: Callable[[Path, Callable[[Path], object]], Path] = put_in_place,
                  skipped: Callable[[OutputFile, Exception], None] = warn_skipped) -> Iterator[tuple[OutputFile, Path]]:
    """Write each of `OUTPUTS` into `out_dir`, in order, yielding (output, path) after each one.
    `put(final path, writer)` places a file; an optional output whose write fails goes to `skipped`
    (which may raise to stop), any other failure propagates."""
    out = Path(out_dir)
    for output in OUTPUTS:
        try:
            path = put(out / output.filename, lambda p, output=output: output.write(run, p))
        except Exception as error:  # noqa: BLE001 - an optional output never fails the run by itself
            if not output.optional:
                raise
            skipped(output, error)
            continue
        yield output, path
