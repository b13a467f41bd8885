"""JSON shapes of the API's objects (built from store rows)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from rigl_core.sparse.schedules import update_schedule
from rigl_core.spec import JobSpec, SparsitySpec
from store.search import RANGE_FIELDS, best_trial
from store.db import ArchitectureRecord, Checkpoint, DatasetRecord, Event, Job, WeightsRecord
from store.uploads import program_of


TAG_PATTERN = r"^[a-z0-9_.:-]{1,64}$"
MAX_TAGS = 20
MAX_METADATA_KEYS = 64
MAX_METADATA_BYTES = 16 * 1024
LABELS = ("name", "tags", "metadata")


NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
# One definition of each label rule, shared by submission (JobSubmission) and edits (LabelsPatch)
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN,
                            description="A label for lists and the dashboard (not unique; no control characters).")]
Tags = Annotated[list[Annotated[str, StringConstraints(pattern=TAG_PATTERN)]], Field(
    max_length=MAX_TAGS,
    description=f"At most {MAX_TAGS}, each 1-64 of a-z 0-9 _ . : - ; `GET /v1/jobs?tag=` filters by one.")]
METADATA_DESCRIPTION = (f"Free JSON object: at most {MAX_METADATA_KEYS} keys and {MAX_METADATA_BYTES // 1024} KiB as "
                        "compact JSON; stored and returned as given.")


def bounded_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """The metadata caps (keys, compact JSON bytes, finite numbers): at submit and after an edit's merge."""
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} keys ({len(value)} given)")
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    except ValueError:
        raise ValueError("numbers must be finite (no NaN or Infinity)") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"at most {MAX_METADATA_BYTES} bytes as compact JSON ({size} given)")
    return value


class JobSubmission(JobSpec):
    """`POST /v1/jobs`: a JobSpec plus the user's labels for the job. The labels are stored beside the
    spec, never in it (`job_spec()`), so workers and `rigl train` see the same JobSpec as before."""

    name: Name | None = None
    tags: Tags = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict, description=METADATA_DESCRIPTION)

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        return bounded_metadata(value)

    def job_spec(self) -> JobSpec:
        """The JobSpec without the labels (already validated: built, not validated again)."""
        return JobSpec.model_construct(_fields_set=self.model_fields_set - set(LABELS),
                                       **{name: getattr(self, name) for name in JobSpec.model_fields})


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 with an explicit UTC offset. Every stored time is UTC, but SQLite hands them back
    without a zone, so a naive value is UTC by construction."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()


def job_warnings(job: Job) -> list[str]:
    """What the job's own settings will get wrong, known before it runs (e.g. too few mask updates
    for RigL to work), so a user reads why at submit instead of guessing from a poor accuracy."""
    sparsity = (job.resolved_spec or {}).get("sparsity") or {}
    schedule = sparsity.get("schedule") or {}
    total = job.total_steps or 0
    if total < 1 or "delta_t" not in schedule:
        return []
    try:
        return update_schedule(SparsitySpec.model_validate(sparsity), total)[1]
    except ValueError:  # T_end after the end of training: the job fails with that error, not a warning
        return []


def job_json(job: Job, admin: bool = False) -> dict:
    """`admin`: show `worker` (the holder's host:pid), which is infrastructure detail, not the owner's."""
    total = job.total_steps or 0
    return {
        "id": job.id,
        "object": "job",
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "attempt": job.attempt,
        "worker": job.worker if admin else None,
        "progress": {"step": job.step, "total_steps": total, "fraction": (job.step / total) if total else 0.0},
        "metrics": job.metrics,
        "result": job.result,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "cancel_requested": job.cancel_requested,
        # requested: N or "all"; a worker owning fewer can't claim it (a waiting job says so in `error`)
        "devices": ((job.resolved_spec or {}).get("training") or {}).get("devices", 1),
        "name": job.name,
        "tags": job.tags or [],
        "metadata": job.meta or {},
        "method": job.method,
        "sweep_id": getattr(job, "sweep_id", None),
        "spec": job.spec,
        "warnings": job_warnings(job),
    }


def event_json(event: Event) -> dict:
    return {"id": event.id, "object": "event", "created_at": iso(event.created_at), "type": event.type,
            "level": event.level, "message": event.message, "data": event.data}


def checkpoint_json(row: Checkpoint) -> dict:
    return {"id": row.id, "object": "checkpoint", "kind": row.kind, "step": row.step, "filename": row.filename,
            "sha256": row.sha256, "size": row.size, "created_at": iso(row.created_at), "metrics": row.metrics}


def architecture_json(row: ArchitectureRecord) -> dict:
    """`kind` layers (declarative, `architecture`) or program (a torch.export upload, `program`)."""
    body = {"id": row.id, "object": "architecture", "name": row.name, "params": row.params,
            "created_at": iso(row.created_at)}
    program = program_of(row)
    if program is not None:
        return {**body, "kind": "program", "program": program}
    return {**body, "kind": "layers", "architecture": row.spec}


def dataset_json(row: DatasetRecord) -> dict:
    return {"id": row.id, "object": "dataset", "name": row.name, "format": row.format, "size": row.size,
            "sha256": row.sha256, "num_samples": row.num_samples, "num_val": row.num_val,
            "input_shape": row.input_shape, "num_classes": row.num_classes, "created_at": iso(row.created_at)}


def weights_json(row: WeightsRecord) -> dict:
    return {"id": row.id, "object": "weights", "name": row.name, "size": row.size, "sha256": row.sha256,
            "tensors": row.tensors, "params": row.params, "created_at": iso(row.created_at)}


MAX_SWEEP_AXIS = 16
MAX_SWEEP_SEEDS = 8


class SweepGrid(BaseModel):
    """The axes of a sweep; an axis left out keeps the base spec's value. Values are checked against the
    JobSpec per child (a bad one is a 422 naming `grid.<axis>`)."""

    model_config = ConfigDict(extra="forbid")
    sparsity: list[float] | None = Field(None, min_length=1, max_length=MAX_SWEEP_AXIS,
                                         description="sparsity.sparsity values")
    method: list[str] | None = Field(None, min_length=1, max_length=MAX_SWEEP_AXIS,
                                     description="sparsity.method values")
    structure: list[str] | None = Field(None, min_length=1, max_length=MAX_SWEEP_AXIS,
                                        description="sparsity.structure values (unstructured, fan-in)")
    distribution: list[str] | None = Field(None, min_length=1, max_length=MAX_SWEEP_AXIS,
                                           description="sparsity.distribution values")
    seed: list[int] | None = Field(None, min_length=1, max_length=MAX_SWEEP_SEEDS, description="training.seed values")

    @field_validator("sparsity", "method", "structure", "distribution", "seed")
    @classmethod
    def _distinct(cls, value: list | None) -> list | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("values must be distinct")
        return value


class SweepRange(BaseModel):
    """A numeric range a random or optuna sweep draws a JobSpec field from."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    low: float
    high: float
    log: bool = Field(False, description="Draw log-uniformly (low must be > 0).")

    @model_validator(mode="after")
    def _ordered(self) -> "SweepRange":
        if not self.low < self.high:
            raise ValueError("low must be less than high")
        if self.log and self.low <= 0:
            raise ValueError("log needs low > 0")
        return self


class SweepPruner(BaseModel):
    """How an optuna sweep stops poor children early, from their per-epoch val_accuracy."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["median", "successive_halving", "none"] = Field(
        "median", description="median: Optuna's MedianPruner; successive_halving: its SuccessiveHalvingPruner.")
    startup_trials: int = Field(2, ge=0, le=1000, description="median: finished trials before any is pruned.")
    warmup_evals: int = Field(1, ge=0, le=100_000, description="Evaluations (epochs) a child runs before it can "
                              "be pruned (successive_halving: its min_resource).")


class SweepSubmission(BaseModel):
    """`POST /v1/sweeps`: a base job (a JobSpec with optional name/tags/metadata), the axes (`grid`), and how
    to search them: every combination (`grid`), or `trials` points drawn at random or by Optuna (TPE),
    which also draw numeric `ranges`."""

    model_config = ConfigDict(extra="forbid")
    name: Name | None = None
    base: JobSubmission
    grid: SweepGrid = Field(default_factory=SweepGrid)
    strategy: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of the axes. random: `trials` points, each axis a uniform "
        "choice and each range uniform (log-uniform with log), reproducible from `seed`. optuna: `trials` points "
        "asked from an Optuna study (TPE) as children finish, poor children pruned (`pruner`).")
    trials: int | None = Field(None, ge=1, le=1024, description="random/optuna: how many children (the budget).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random/optuna: the sampler's seed.")
    ranges: dict[str, SweepRange] = Field(default_factory=dict, max_length=8, description="random/optuna: JobSpec "
                                          "field -> {low, high, log}; fields: " + ", ".join(RANGE_FIELDS) + ".")
    parallel: int | None = Field(None, ge=1, le=256, description="optuna: children running at once (default "
                                 "min(trials, 4)); each finished one lets the study ask the next.")
    pruner: SweepPruner | None = Field(None, description="optuna: early stopping (default: median).")

    @field_validator("ranges")
    @classmethod
    def _known_fields(cls, value: dict[str, SweepRange]) -> dict[str, SweepRange]:
        for path, spec in value.items():
            if path not in RANGE_FIELDS:
                raise ValueError(f"{path!r} is not a range field; use one of {', '.join(RANGE_FIELDS)}")
            if RANGE_FIELDS[path] is int and (spec.low != int(spec.low) or spec.high != int(spec.high)):
                raise ValueError(f"{path}: low and high must be whole numbers")
        return value


def sweep_json(sweep, children: list[dict], table: dict) -> dict:
    """A sweep with its children (jobs and held entries), progress by status, and the aggregate table."""
    counts: dict[str, int] = {}
    for child in children:
        counts[child["status"]] = counts.get(child["status"], 0) + 1
    finished = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    total = sweep.children
    status = "cancelled" if sweep.status == "cancelled" else "finished" if finished == total else "active"
    search = getattr(sweep, "search", None) or {}
    searched = {"strategy": search.get("strategy", "grid"), "trials": search.get("trials"),
                "seed": search.get("seed"), "ranges": search.get("ranges") or {}, "parallel": search.get("parallel"),
                "pruner": search.get("pruner"), "best": best_trial(children) if search else None,
                "pruned": sum(1 for child in children if child.get("pruned"))}
    return {"id": sweep.id, "object": "sweep", "name": sweep.name, "status": status, **searched,
            "created_at": iso(sweep.created_at), "grid": sweep.grid, "base": sweep.base,
            "progress": {"total": total, "finished": finished, "fraction": finished / total if total else 1.0,
                         "by_status": counts},
            "children": children, "aggregate": table["groups"], "frontier": table["frontier"]}
