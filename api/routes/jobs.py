"""Jobs: create, list, get, cancel, events (poll and SSE), metrics, sparsity, checkpoints."""

from __future__ import annotations

import asyncio
import hashlib
import json

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse

from api.context import Context, get_context
from api.errors import ApiError
from api.schemas import checkpoint_json, event_json, job_json
from api.submission import resolve
from rigl_core.spec import JobSpec
from store.dispatch import dispatch
from store.jobs import TERMINAL, IdempotencyConflict

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "cancelling", "requeued")


def _job_or_404(ctx: Context, job_id: str):
    job = ctx.store.get_job(job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job


@router.post("", status_code=201)
def create_job(spec: JobSpec, response: Response, ctx: Context = Depends(get_context),
               idempotency_key: str | None = Header(None, min_length=1, max_length=200)) -> dict:
    """Validate, store as `queued`, enqueue. The body is a JobSpec; unknown fields are rejected.

    With `Idempotency-Key`, the same key and body replay the first job; another body is a 422.
    """
    body = spec.model_dump(mode="json", exclude_unset=True)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if idempotency_key is not None:
        replay = _replay(ctx, idempotency_key, digest, response)
        if replay is not None:
            return replay
    if ctx.store.count_active(ctx.principal) >= ctx.settings.max_active_jobs_per_owner:
        raise ApiError(429, "too_many_jobs", f"at most {ctx.settings.max_active_jobs_per_owner} queued or running "
                                             "jobs per owner; retry when one ends", None, headers={"Retry-After": "30"})
    resolved, total_steps = resolve(spec, ctx.store, ctx.artifacts, ctx.settings, ctx.owner)
    try:
        job = ctx.store.create_job(body, resolved, total_steps, owner=ctx.principal,
                                   idempotency=(idempotency_key, digest) if idempotency_key else None)
    except IdempotencyConflict:
        return _replay(ctx, idempotency_key, digest, response)
    if not dispatch(ctx.store, ctx.enqueue, job.id):  # stored and accepted; the reaper sends it later
        job = ctx.store.get_job(job.id)
    return job_json(job)


def _replay(ctx: Context, key: str, digest: str, response: Response) -> dict | None:
    record = ctx.store.idempotent_job(ctx.principal, key)
    if record is None:
        return None
    if record.body_sha256 != digest:
        raise ApiError(422, "idempotency_mismatch", "this Idempotency-Key was used with a different body",
                       "Idempotency-Key")
    response.headers["Idempotent-Replayed"] = "true"
    return job_json(ctx.store.get_job(record.job_id))


@router.get("")
def list_jobs(limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, max_length=40),
              status: str | None = Query(None), ctx: Context = Depends(get_context)) -> dict:
    if status is not None and status not in STATUSES:
        raise ApiError(422, "invalid_request", f"status must be one of {', '.join(STATUSES)}", "status")
    try:
        jobs, has_more = ctx.store.list_jobs(limit, after, status, ctx.owner)
    except KeyError:
        raise ApiError(422, "invalid_request", f"no job {after!r} to page after", "after") from None
    return {"object": "list", "data": [job_json(j) for j in jobs], "has_more": has_more}


@router.get("/{job_id}")
async def get_job(job_id: str, ctx: Context = Depends(get_context)) -> Response:
    """The hottest route (clients poll it): one indexed lookup, no thread hop, pre-encoded JSON."""
    job = ctx.store.get_job_view(job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return Response(json.dumps(job_json(job)), media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202)
def cancel_job(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    job = ctx.store.request_cancel(job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job_json(job)


@router.get("/{job_id}/events")
def list_events(job_id: str, after: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000),
                ctx: Context = Depends(get_context)) -> dict:
    _job_or_404(ctx, job_id)
    events = ctx.store.list_events(job_id, after, limit + 1)
    return {"object": "list", "data": [event_json(e) for e in events[:limit]], "has_more": len(events) > limit}


@router.get("/{job_id}/events/stream")
async def stream_events(job_id: str, request: Request, after: int = Query(0, ge=0),
                        last_event_id: str | None = Header(None), ctx: Context = Depends(get_context)):
    """Server-sent events; reconnect with `Last-Event-ID` to resume. Ends when the job has ended."""
    await run_in_threadpool(_job_or_404, ctx, job_id)
    cursor = int(last_event_id) if last_event_id and last_event_id.isdigit() else after

    async def generate():
        nonlocal cursor
        idle = 0.0
        while True:
            events = await run_in_threadpool(ctx.store.list_events, job_id, cursor, 200)
            if events:  # one write per poll, not per event: far fewer syscalls and browser wake-ups
                cursor = events[-1].id
                yield "".join(f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(event_json(e))}\n\n" for e in events)
            if not events:
                job = await run_in_threadpool(ctx.store.get_job, job_id)
                if job is None or job.status in TERMINAL:
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)
                idle += 0.5
                if idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/metrics")
def metrics(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    """Every curve of a job: training loss, evaluations, and per mask update its drop fraction, churn
    and exploration (the per-layer detail of updates stays in the event stream)."""
    job = _job_or_404(ctx, job_id)
    series = {"metrics": [], "eval": [], "mask_update": []}
    cursor = 0
    while True:
        events = ctx.store.list_events(job_id, cursor, 1000, types=tuple(series))
        for e in events:
            data = e.data
            if e.type == "mask_update":
                data = {k: v for k, v in data.items() if k != "layers"}
            series[e.type].append(data)
        if len(events) < 1000:
            break
        cursor = events[-1].id
    return {"object": "metrics", "job_id": job.id, "latest": job.metrics, "train": series["metrics"],
            "eval": series["eval"], "mask_updates": series["mask_update"]}


@router.get("/{job_id}/sparsity")
def sparsity(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    """The per-layer report: measured once the job succeeded, the plan (targets) before."""
    job = _job_or_404(ctx, job_id)
    report_path = ctx.artifacts.job_file(job_id, "report.json")
    if job.status == "succeeded" and report_path.is_file():
        report = json.loads(report_path.read_text())
        return {"object": "sparsity", "job_id": job_id, "final": True, "layers": report["layers"],
                "totals": report["totals"], "leak_check": report["leak_check"]}
    from rigl_core.datasets.describe import describe
    from rigl_core.models import build_model
    from rigl_core.plan import make_plan

    spec = JobSpec.model_validate(job.resolved_spec)
    shape = describe(spec.dataset)
    input_shape = shape.input_shape if shape else (spec.model.input_shape or [])
    num_classes = spec.model.num_classes or (shape.num_classes if shape else None)
    if not input_shape or num_classes is None:
        raise ApiError(409, "not_ready", "the report is available when the job has succeeded", "job_id")
    model = build_model(spec.model.name, num_classes, input_shape, spec.model.hidden_sizes, device="meta",
                        architecture=spec.model.architecture)
    plan = make_plan(model, input_shape, spec.sparsity).to_dict()
    return {"object": "sparsity", "job_id": job_id, "final": False, "layers": plan["layers"],
            "totals": plan["totals"]}


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    _job_or_404(ctx, job_id)
    return {"object": "list", "data": [checkpoint_json(c) for c in ctx.store.list_checkpoints(job_id)],
            "has_more": False}


@router.get("/{job_id}/checkpoint")
def download_checkpoint(job_id: str, format: str = Query("dense", pattern="^(dense|packed)$"),
                        ctx: Context = Depends(get_context)):
    """The final export: `dense` (state_dict with exact zeros) or `packed` (values + bit masks)."""
    _job_or_404(ctx, job_id)
    row = ctx.store.latest_checkpoint(job_id, format)
    if row is None:
        raise ApiError(404, "not_found", f"job {job_id!r} has no {format} checkpoint yet", "format")
    path = ctx.artifacts.job_file(job_id, row.filename)
    if not path.is_file():
        raise ApiError(404, "not_found", "the checkpoint file is missing", "format")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}-{row.filename}",
                        headers={"X-Content-SHA256": row.sha256, "ETag": f'"{row.sha256}"'})
