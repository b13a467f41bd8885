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
from api.schemas import LABELS, SweepPruner, SweepSubmission, sweep_json
from api.submission import resolve
from rigl_core.spec import JobSpec
from rigl_core.optional import MissingExtra, require
from store import search as searching
from store import sweeps as stored
from store.db import new_id
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
    search = _search_of(submission, grid, ctx.settings.max_sweep_children)
    if search is None:
        if not grid:
            raise ApiError(422, "invalid_sweep", "give at least one axis: " + _axes_named(), "grid")
        size = math.prod(len(values) for values in grid.values())
        if size > ctx.settings.max_sweep_children:
            raise ApiError(422, "invalid_sweep", f"the grid makes {size} jobs; at most "
                           f"{ctx.settings.max_sweep_children}", "grid")
    else:  # random: `trials` children, held as a grid's are; optuna asks them as others finish, under the same cap
        size = search["trials"] if search["strategy"] == "random" else min(search["parallel"], search["trials"])
    cap = ctx.settings.max_sweep_children_per_owner
    with ctx.store.sessions() as s:  # cheap early answer, before every child is resolved; create_sweep enforces it
        unfinished = stored.unfinished_children(s, ctx.principal)
    if unfinished + size > cap:
        raise _too_many_children(cap, unfinished, size)
    body = submission.base.model_dump(mode="json", exclude_unset=True)
    labels = {key: body.pop(key) for key in LABELS if key in body}  # body is now the JobSpec alone
    prefix = (labels.get("name") or submission.name or "sweep")[:150]
    if search is not None and search["strategy"] == "optuna":
        return _create_optuna(ctx, submission, grid, search, body, labels, prefix, idempotency_key, digest, response)
    points = stored.expand(body, grid) if search is None else \
        [(params, searching.point_tree(body, params)) for params in
         searching.sample_random(grid, search["ranges"], search["trials"], search["seed"])]
    entries = []
    for params, tree in points:
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
        label = "/".join(str(value) if axis != "seed" else f"seed{value}" for axis, value in params.items()
                         if axis in stored.AXES)
        name = f"{prefix} {label}" if search is None else searching.label(prefix, len(entries), params)
        entries.append({"spec": tree, "resolved": resolved, "total_steps": total_steps, "plan": plan,
                        "params": stored.params_of(resolved), "name": name[:200],
                        "tags": labels.get("tags"), "metadata": labels.get("metadata")})
    try:
        sweep, created = stored.create_sweep(ctx.store, ctx.principal, submission.name, {**body, **labels}, grid,
                                             entries, ctx.settings.max_active_jobs_per_owner,
                                             (idempotency_key, digest) if idempotency_key else None,
                                             artifacts_quota=limits(ctx)["artifacts"], max_children=cap,
                                             search=search)
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


def _search_of(submission: SweepSubmission, grid: dict, most: int) -> dict | None:
    """The sweep's `search` column: None for a grid (whose search-only fields are refused)."""
    if submission.strategy == "grid":
        for field in ("trials", "parallel", "pruner"):
            if getattr(submission, field) is not None:
                raise ApiError(422, "invalid_sweep", f"{field} applies to strategy random or optuna", field)
        if submission.ranges:
            raise ApiError(422, "invalid_sweep", "ranges apply to strategy random or optuna", "ranges")
        return None
    if submission.trials is None:
        raise ApiError(422, "invalid_sweep", f"strategy {submission.strategy} needs a budget: trials", "trials")
    if submission.trials > most:
        raise ApiError(422, "invalid_sweep", f"{submission.trials} trials; at most {most}", "trials")
    if not grid and not submission.ranges:
        raise ApiError(422, "invalid_sweep", "give at least one axis or range", "grid")
    if "sparsity" in grid and "sparsity.sparsity" in submission.ranges:
        raise ApiError(422, "invalid_sweep", "sparsity is both an axis and a range; give one", "ranges")
    if submission.strategy == "random" and (submission.parallel is not None or submission.pruner is not None):
        field = "parallel" if submission.parallel is not None else "pruner"
        raise ApiError(422, "invalid_sweep", f"{field} applies to strategy optuna", field)
    search = {"strategy": submission.strategy, "trials": submission.trials, "seed": submission.seed,
              "ranges": {path: r.model_dump() for path, r in submission.ranges.items()}}
    if submission.strategy == "optuna":
        search["parallel"] = submission.parallel or min(submission.trials, 4)
        search["pruner"] = (submission.pruner or SweepPruner()).model_dump()
    return search


def _create_optuna(ctx: Context, submission: SweepSubmission, grid: dict, search: dict, body: dict, labels: dict,
                   prefix: str, idempotency_key: str | None, digest: str, response: Response) -> dict:
    """Validate the base once and every axis value and range end on it, start the study in the job
    database, ask the first trials that fit (store/search.py asks the rest as children finish)."""
    try:
        require("optuna", "optuna", "Sweeps with strategy optuna")
    except MissingExtra as error:
        raise ApiError(422, "invalid_sweep", str(error), "strategy") from None
    try:
        base = JobSpec.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field, message = named_field(_loc_to_field(first["loc"]), str(first["msg"]).removeprefix("Value error, "))
        raise ApiError(422, "invalid_sweep", message, f"base.{field}" if field != "body" else "base") from None
    try:
        resolved, total_steps, _plan = resolve(base, ctx.store, ctx.artifacts, ctx.settings, ctx.owner)
    except ApiError as exc:
        raise _child_error(exc.field, exc.message, {}) from None
    for axis, values in grid.items():
        for value in values:
            _check_point(resolved, {axis: value}, f"grid.{axis}")
    for path, spec in search["ranges"].items():
        for end in ("low", "high"):
            value = int(spec[end]) if searching.RANGE_FIELDS[path] is int else spec[end]
            _check_point(resolved, {path: value}, f"ranges.{path}")
    sweep_id = new_id("sweep")
    storage = searching.optuna_storage(ctx.settings.database_url)
    try:
        searching.create_study(storage, sweep_id)
        cap = ctx.settings.max_active_jobs_per_owner
        first = max(0, min(search["parallel"], search["trials"], cap - ctx.store.count_active(ctx.principal)))
        points = [searching.ask(storage, sweep_id, {**search, "asked": i}, grid) for i in range(first)]
    finally:
        storage.remove_session()
        storage.engine.dispose()
    search = {**search, "resolved": resolved, "total_steps": total_steps, "spec": body,
              "labels": {"prefix": prefix, "tags": labels.get("tags"), "metadata": labels.get("metadata")}}
    try:
        sweep, created = searching.create_search_sweep(
            ctx.store, ctx.principal, submission.name, {**body, **labels}, grid, search, points,
            ctx.settings.max_active_jobs_per_owner, (idempotency_key, digest) if idempotency_key else None,
            artifacts_quota=limits(ctx)["artifacts"], sweep_id=sweep_id)
    except QuotaExceeded as exc:
        raise quota_error(exc, field=None) from None
    except IdempotencyConflict:
        return _replay(ctx, idempotency_key, digest, response)
    for job_id in created:
        dispatch(ctx.store, ctx.enqueue, job_id)
    return _view(ctx, stored.get_sweep(ctx.store, sweep.id))


def _check_point(resolved: dict, params: dict, field: str) -> None:
    tree, error = searching.make_child({}, resolved, params)
    if error is not None:
        raise ApiError(422, "invalid_sweep", error, field)


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
    search = sweep.search or {}
    trials, pruned = search.get("jobs") or {}, search.get("pruned") or {}
    children = []
    for job in jobs:
        result = job.result or {}
        point = {path: searching.get_path(job.resolved_spec or {}, path) for path in search.get("ranges") or {}}
        children.append({
            "id": job.id, "status": job.status, "params": stored.params_of(job.resolved_spec or {}),
            "point": {**{axis: stored.params_of(job.resolved_spec or {})[axis] for axis in sweep.grid}, **point}
            if search else None, "trial": trials.get(job.id),
            # a child the pruner chose that succeeded before its cancel arrived ran to the end: not pruned
            "pruned": pruned.get(job.id) if job.status != "succeeded" else None,
            "progress": (job.step / job.total_steps) if job.total_steps else 0.0,
            "val_accuracy": (result.get("final_metrics") or {}).get("val_accuracy"),
            "inference_flops_ratio": result.get("inference_flops_ratio"),
            "packed_bytes": sizes.get(job.id), "latency_ms": stored.latency_ms(result),
            "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None})
    held_status = "cancelled" if sweep.status == "cancelled" else "held"
    for entry in sweep.held or []:
        children.append({"id": None, "status": held_status, "params": entry["params"], "point": None, "trial": None,
                         "pruned": None, "progress": 0.0,
                         "val_accuracy": None, "inference_flops_ratio": None, "packed_bytes": None,
                         "latency_ms": None, "error": None})
    return sweep_json(sweep, children, stored.aggregate(children))
