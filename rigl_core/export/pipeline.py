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

from rigl_core.export.formats import (COMPRESSED_EXPORT, CONDENSED_EXPORT, DENSE_EXPORT, EXPORTS, ONNX_EXPORT,
                                      PACKED_EXPORT, REPORT)


@dataclass(frozen=True)
class TrainedRun:
    """What the writers read: the trained model, its masks, its input shape, the export precision, the report."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    input_shape: tuple | None
    values: str
    report: dict
    fan_in: bool = False  # constant fan-in masks (sparsity.structure fan-in): the condensed export applies
    measure_latency: bool = False  # put measured batch-1 CPU latencies into the report first (export.latency)

    @classmethod
    def of(cls, trainer, report: dict) -> "TrainedRun":
        spec = trainer.spec
        return cls(trainer.model, trainer.sparsifier.masks, trainer.input_shape, spec.export.values, report,
                   fan_in=spec.sparsity.fan_in and spec.sparsity.method != "dense", measure_latency=spec.export.latency)


@dataclass(frozen=True)
class OutputFile:
    kind: str  # "report", or the export's kind in checkpoint rows ("dense", "packed", …)
    filename: str
    write: Callable[[TrainedRun, Path], object]
    optional: bool = False  # a failure is skipped with a note (the ONNX exporter can't trace every model)
    applies: Callable[[TrainedRun], bool] = lambda run: True  # noqa: E731 - e.g. condensed: fan-in runs only

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


def _write_condensed(run: TrainedRun, path: Path) -> None:
    from rigl_core.export.condensed import save_condensed

    save_condensed(run.model, run.masks, path, run.values)


def _write_onnx(run: TrainedRun, path: Path) -> None:
    from rigl_core.export.onnx import export_onnx

    export_onnx(run.model, run.input_shape, path)


OUTPUTS: tuple[OutputFile, ...] = (
    OutputFile("report", REPORT, _write_report),
    OutputFile("dense", DENSE_EXPORT, _write_dense),
    OutputFile("packed", PACKED_EXPORT, _write_packed),
    OutputFile("compressed", COMPRESSED_EXPORT, _write_compressed),
    OutputFile("condensed", CONDENSED_EXPORT, _write_condensed, applies=lambda run: run.fan_in),
    OutputFile("onnx", ONNX_EXPORT, _write_onnx, optional=True),
)
assert {o.kind: o.filename for o in OUTPUTS if o.is_export} == EXPORTS, "formats.py and OUTPUTS disagree"


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
    if run.measure_latency and run.input_shape is not None:
        run.report["inference_latency_ms"] = latency_of(run)
    for output in OUTPUTS:
        if not output.applies(run):
            continue
        try:
            path = put(out / output.filename, lambda p, output=output: output.write(run, p))
        except Exception as error:  # noqa: BLE001 - an optional output never fails the run by itself
            if not output.optional:
                raise
            skipped(output, error)
            continue
        yield output, path


def latency_of(run: TrainedRun) -> dict[str, float] | None:
    """Batch-1 CPU latency of the dense model and, for a fan-in run, of the condensed one (ms), or None when
    the model cannot be timed on a CPU this way (a note goes to the warnings)."""
    import copy

    from rigl_core.report.latency import measure_latency

    try:
        variants = {"dense": run.model}
        if run.fan_in:  # condensed in memory, as the export stores it (no file written and read back)
            from rigl_core.export.condensed import condense_state_dict
            from rigl_core.export.condensed_layers import condense_into

            arrays, metadata = condense_state_dict(run.model, run.masks)
            variants["condensed"] = condense_into(copy.deepcopy(run.model).to("cpu").float(), arrays,
                                                  json.loads(metadata["rigl"]))
        return measure_latency(variants, run.input_shape)
    except Exception as error:  # noqa: BLE001 - a measurement never fails the run
        warnings.warn(f"latency not measured: {str(error).splitlines()[0] if str(error) else repr(error)}", stacklevel=2)
        return None
