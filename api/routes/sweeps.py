"""Sweeps: create a grid of jobs, read it with its aggregate table and Pareto frontiers, cancel, delete.

Every child goes through the same validation as `POST /v1/jobs` (api/submission.resolve: the same caps),
all of them before anything is stored, so a sweep is created whole or not at all. Children past the
owner's active-job cap are held in the sweep and released as the owner's jobs end (store/sweeps.py).
"""

from __future__ import annotations

import hashlib
import json
import math

from fastapi import APIRouter, Depends, Header, Query, Response
from pydantic import ValidationError

from api.context import Context, get_context
from api.errors import ApiError, _loc_to_field, named_field
from api.idempotency import replayed
from api.quotas import limits, quota_error
from api.schemas import LABELS, SweepSubmission, sweep_json
from api.submission import resolve
from rigl_core.spec import JobSpec
from store import sweeps as stored
from store.deletion import InUse
from store.idempotency import IdempotencyConflict
from store.dispatch import dispatch
from store.quotas import QuotaExceeded

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])
AXIS_OF_FIELD = {f"{section}.{field}": axis for axis, (section, field) in stored.AXES.items()}


def _axes_named() -> str:
    *first, last = stored.AXES
    return f"{', '.join(first)} or {last}"


def _sweep_or_404(ctx: Context, sweep_id: str):
    sweep = stored.get_sweep(ctx.store, sweep_id, ctx.owner)
    if sweep is None:
        raise ApiError(404, "not_found", f"no sweep {sweep_id!r}", "sweep_id")
    return sweep


def _child_error(field: str | None, message: str, params: dict) -> ApiError:
    """A child's error names the grid axis that set the field, else the base spec's field."""
    where = ", ".join(f"{axis}={value}" for axis, value in params.items())
    axis = AXIS_OF_FIELD.get(field or "")
    named = f"grid.{axis}" if axis in params else f"base.{field}" if field else "base"
    return ApiError(422, "invalid_sweep", f"{message} (child {where})" if where else message, named)


@router.post("", status_code=201)
def create_sweep(submission: SweepSubmission, response: Response, ctx: Context = Depends(get_context),
                 idempotency_key: str | None = Header(None, min_length=1, max_length=200)) -> dict:
    """Expand the grid (method × structure × distribution × sparsity × seed over the base spec), validate every child
    as `POST /v1/jobs` would, then store the sweep and queue the children the owner's cap allows; the rest
    wait in the sweep (a sweep queues, it does not fail on the cap).

    With `Idempotency-Key`, the same key and body replay the first sweep; another body (or a key already
    used for a job) is a 422."""
    digest = hashlib.sha256(json.dumps({"sweep": submission.model_dump(mode="json", exclude_unset=True)},
                                       sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        replay = _replay(ctx, idempotency_key, digest, response)
        if replay is not None:
            return replay
    grid = submission.grid.model_dump(exclude_none=True)
    if not grid:
        raise ApiError(422, "invalid_sweep", "give at least one axis: " + _axes_named(), "grid")
    size = math.prod(len(values) for values in grid.values())
    if size > ctx.settings.max_sweep_children:
        raise ApiError(422, "invalid_sweep", f"the grid makes {size} jobs; at most {ctx.settings.max_sweep_children}",
                       "grid")
    cap = ctx.settings.max_sweep_children_per_owner
    with ctx.store.sessions() as s:  # cheap early answer, before every child is resolved; create_sweep enforces it
        unfinished = stored.unfinished_children(s, ctx.principal)
    if unfinished + size > cap:
        raise _too_many_children(cap, unfinished, size)
    body = submission.base.model_dump(mode="json", exclude_unset=True)
    labels = {key: body.pop(key) for key in LABELS if key in body}  # body is now the JobSpec alone
    prefix = (labels.get("name") or submission.name or "sweep")[:150]
    entries = []
    for params, tree in stored.expand(body, grid):
        try:
            spec = JobSpec.model_validate(tree)
        except ValidationError as exc:
            first = exc.errors()[0]
            message = str(first["msg"]).removeprefix("Value error, ")
            field, message = named_field(_loc_to_field(first["loc"]), message)
            raise _child_error(None if field == "body" else field, message, params) from None
        try:
            resolved, total_steps, plan = resolve(spec, ctx.store, ctx.artifacts, ctx.settings, ctx.owner)
        except ApiError as exc:
            raise _child_error(exc.field, exc.message, params) from None
        label = "/".join(str(value) if axis != "seed" else f"seed{value}" for axis, value in params.items())
        entries.append({"spec": tree, "resolved": resolved, "total_steps": total_steps, "plan": plan,
                        "params": stored.params_of(resolved), "name": f"{prefix} {label}"[:200],
                        "tags": labels.get("tags"), "metadata": labels.get("metadata")})
    try:
        sweep, created = stored.create_sweep(ctx.store, ctx.principal, submission.name, {**body, **labels}, grid,
                                             entries, ctx.settings.max_active_jobs_per_owner,
                                             (idempotency_key, digest) if idempotency_key else None,
                                             artifacts_quota=limits(ctx)["artifacts"], max_children=cap)
    except stored.TooManySweepChildren as exc:
        raise _too_many_children(cap, exc.unfinished, exc.adding) from None
    except QuotaExceeded as exc:
        raise quota_error(exc, field=None) from None
    except IdempotencyConflict:  # its twin committed while this one validated: answer with that sweep
        return _replay(ctx, idempotency_key, digest, response)
    for job_id in created:
        dispatch(ctx.store, ctx.enqueue, job_id)  # unsent: the reaper sends it (store/dispatch.py)
    return _view(ctx, stored.get_sweep(ctx.store, sweep.id))


def _too_many_children(cap: int, unfinished: int, adding: int) -> ApiError:
    """As the active-job cap answers (429, Retry-After), naming the grid that would pass it."""
    return ApiError(429, "too_many_sweep_children", f"at most {cap} unfinished sweep children per owner "
                                                    f"(held, queued or running); {unfinished} now, this grid makes "
                                                    f"{adding}; retry when some end, or cancel a sweep", "grid",
                    headers={"Retry-After": "30"})


def _replay(ctx: Context, key: str, digest: str, response: Response) -> dict | None:
    sweep = replayed(ctx, key, digest, response, lambda sweep_id: stored.get_sweep(ctx.store, sweep_id, ctx.owner))
    return _view(ctx, sweep) if sweep is not None else None


@router.get("")
def list_sweeps(limit: int = Query(20, ge=1, le=100), ctx: Context = Depends(get_context)) -> dict:
    """Newest first, without each sweep's children (GET /v1/sweeps/{id} has them)."""
    data = []
    for sweep in stored.list_sweeps(ctx.store, ctx.owner, limit):
        view = _view(ctx, sweep)
        view.pop("children")
        data.append(view)
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{sweep_id}")
def get_sweep(sweep_id: str, ctx: Context = Depends(get_context)) -> dict:
    """The sweep, its children (jobs, and held entries not started yet), progress, and the aggregate:
    per (method, structure, distribution, sparsity) the mean ± sd of val_accuracy over seeds, the inference
    FLOPs ratio, the packed export's bytes and the measured batch-1 CPU latency, with the Pareto frontiers
    against each cost."""
    return _view(ctx, _sweep_or_404(ctx, sweep_id))


@router.post("/{sweep_id}/cancel", status_code=202)
def cancel_sweep(sweep_id: str, ctx: Context = Depends(get_context)) -> dict:
    """Held children never start; every child job not finished is cancelled (as POST /v1/jobs/{id}/cancel)."""
    _sweep_or_404(ctx, sweep_id)
    sweep = stored.cancel_sweep(ctx.store, sweep_id, ctx.owner)
    if sweep is None:
        raise ApiError(404, "not_found", f"no sweep {sweep_id!r}", "sweep_id")
    return _view(ctx, sweep)


@router.delete("/{sweep_id}")
def delete_sweep(sweep_id: str, response: Response, ctx: Context = Depends(get_context)) -> dict:
    """Delete the sweep and its children with their artifacts (as DELETE /v1/jobs/{id}). 202 when some
    child was running: it is cancelled and deleted once its worker has stopped it. 409 when an active job
    starts from a child's export (`model.init_from_job`): the sweep is cancelled, that child is kept."""
    try:
        done = stored.delete_sweep(ctx.store, ctx.artifacts, sweep_id, ctx.owner)
    except InUse as exc:
        raise ApiError(409, "in_use", f"a child of sweep {sweep_id!r} is started from by active job or sweep "
                                      f"{exc.job_id!r}; cancel it or wait for it to finish", "sweep_id") from None
    if done is None:
        raise ApiError(404, "not_found", f"no sweep {sweep_id!r}", "sweep_id")
    if done["pending"]:
        response.status_code = 202
    return {"id": sweep_id, "object": "sweep", "deleted": True, "jobs_deleted": done["deleted"],
            "jobs_pending_deletion": done["pending"]}


def _view(ctx: Context, sweep) -> dict:
    jobs = stored.sweep_jobs(ctx.store, sweep.id)
    sizes = stored.packed_sizes(ctx.store, [job.id for job in jobs if job.status == "succeeded"])
    children = []
    for job in jobs:
        result = job.result or {}
        children.append({
            "id": job.id, "status": job.status, "params": stored.params_of(job.resolved_spec or {}),
            "progress": (job.step / job.total_steps) if job.total_steps else 0.0,
            "val_accuracy": (result.get("final_metrics") or {}).get("val_accuracy"),
            "inference_flops_ratio": result.get("inference_flops_ratio"),
            "packed_bytes": sizes.get(job.id), "latency_ms": stored.latency_ms(result),
            "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None})
    held_status = "cancelled" if sweep.status == "cancelled" else "held"
    for entry in sweep.held or []:
        children.append({"id": None, "status": held_status, "params": entry["params"], "progress": 0.0,
                         "val_accuracy": None, "inference_flops_ratio": None, "packed_bytes": None,
                         "latency_ms": None, "error": None})
    return sweep_json(sweep, children, stored.aggregate(children))
