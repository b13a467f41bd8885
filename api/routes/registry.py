"""`POST /v1/jobs/{id}/register`: a finished job's MLflow model as a new version of a registered model.

The worker logged the job as an MLflow run with its ONNX export as an MLflow model (worker/tracking.py);
registering makes that a model version a team's MLflow UI and clients already read, carrying the job's
lineage as version tags (job id, method, sparsity, owner, the spec's, dataset's, weights' and exports'
SHA-256) and the spec in its description. The job store stays the source of truth: the version points
back to the job by id.
"""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from api.context import Context, get_context
from api.errors import ApiError
from rigl_core.integrations.mlflow import resolve_target, shown_uri
from rigl_core.optional import MissingExtra

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=250, pattern=r"^[^\x00-\x1f\x7f/]+$",
                      description="The registered model's name (created when missing); no control characters or /.")


def lineage(ctx: Context, job) -> dict[str, str]:
    """What the version was made from, as tags: the job, its spec, its data and starting weights, its exports."""
    spec, resolved = job.spec or {}, job.resolved_spec or {}
    sparsity, dataset, model = resolved.get("sparsity") or {}, (spec.get("dataset") or {}), (spec.get("model") or {})
    tags = {"rigl.job_id": job.id, "rigl.method": sparsity.get("method"), "rigl.sparsity": sparsity.get("sparsity"),
            "rigl.owner": job.owner, "rigl.model": (resolved.get("model") or {}).get("name"),
            "rigl.dataset": dataset.get("name"),
            "rigl.spec_sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()}
    if dataset.get("name") == "tensors" and dataset.get("path"):
        record = ctx.store.uploads.get_dataset(dataset["path"])
        tags["rigl.dataset_id"], tags["rigl.dataset_sha256"] = dataset["path"], getattr(record, "sha256", None)
    if model.get("weights"):
        record = ctx.store.uploads.get_weights(model["weights"])
        tags["rigl.weights_id"], tags["rigl.weights_sha256"] = model["weights"], getattr(record, "sha256", None)
    if model.get("init_from_job"):
        source = ctx.store.checkpoints.latest_checkpoint(model["init_from_job"], "dense")
        tags["rigl.init_from_job"] = model["init_from_job"]
        tags["rigl.weights_sha256"] = source.sha256 if source is not None else None
    for kind in ("onnx", "packed"):
        row = ctx.store.checkpoints.latest_checkpoint(job.id, kind)
        if row is not None:
            tags[f"rigl.{kind}_sha256"] = row.sha256
    return {key: str(value) for key, value in tags.items() if value is not None}


def description(job) -> str:
    result = job.result or {}
    accuracy = (result.get("final_metrics") or {}).get("val_accuracy")
    summary = f"RigL job {job.id}" + (f" ({job.name})" if job.name else "") + \
        f": method {job.method}, sparsity {result.get('sparsity')}" + \
        (f", val_accuracy {accuracy:.4f}" if isinstance(accuracy, float) else "")
    return f"{summary}.\n\nJobSpec:\n\n```json\n{json.dumps(job.spec, indent=2, sort_keys=True)}\n```\n"


@router.post("/{job_id}/register", status_code=201)
async def register(job_id: str, body: Registration, ctx: Context = Depends(get_context)) -> dict:
    """Register a succeeded job's MLflow model (its ONNX export, with the packed sparse export beside it)
    as a new version of model `name`, with the job's lineage as version tags. 409 when the job has no
    MLflow run or model; 503 when the tracking server can't be reached."""
    job = await run_in_threadpool(ctx.store.get_job, job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    if job.status != "succeeded":
        raise ApiError(409, "not_finished", f"job {job_id!r} is {job.status}; only a succeeded job is registered",
                       "job_id")
    tracked = (job.result or {}).get("mlflow") or {}
    target = resolve_target((job.resolved_spec or {}).get("tracking"), ctx.settings.mlflow_tracking_uri,
                            ctx.settings.mlflow_experiment)
    if not tracked.get("run_id") or target is None or shown_uri(target.uri) != tracked.get("tracking_uri"):
        raise ApiError(409, "not_tracked", f"job {job_id!r} has no MLflow run on this service's tracking server "
                       "(tracking was off, or MLflow was unreachable while it ran)", "job_id")
    try:
        version = await run_in_threadpool(_register, ctx, job, target.uri, tracked["run_id"], body.name)
    except MissingExtra as error:
        raise ApiError(409, "not_tracked", str(error), "job_id") from None
    return version


def _register(ctx: Context, job, uri: str, run_id: str, name: str) -> dict:
    from rigl_core.integrations.mlflow import has_model, register_model

    try:
        if not has_model(uri, run_id):
            raise ApiError(409, "no_model", f"job {job.id!r}'s MLflow run has no model (its ONNX export was "
                           "skipped)", "job_id")
        version = register_model(uri, run_id, name, lineage(ctx, job), description(job))
    except ApiError:
        raise
    except MissingExtra:
        raise
    except Exception as error:  # noqa: BLE001 - an MLflow server that is down or refuses: not our 500
        first = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise ApiError(503, "tracking_unavailable", f"the MLflow server did not register the model: {first}",
                       None, headers={"Retry-After": "30"}) from None
    return {"object": "model_version", "name": version.name, "version": str(version.version), "run_id": run_id,
            "source": version.source, "status": version.status, "tracking_uri": shown_uri(uri),
            "job_id": job.id, "tags": dict(version.tags or {})}
