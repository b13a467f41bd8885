"""Jobs: create, list, get, edit labels, cancel, events (poll and SSE), metrics, sparsity, checkpoints."""

from __future__ import annotations

import asyncio
import hashlib
import json
import typing

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from api.context import Context, get_context
from api.errors import ApiError, from_value_error
from api.idempotency import replayed
from api.labels import MERGE_PATCH, LabelsPatch, changes
from api.quotas import limits, quota_error
from api.event_hub import EventHub, StreamSlots
from api.schemas import LABELS, TAG_PATTERN, JobSubmission, checkpoint_json, event_json, job_json
from api.submission import resolve
from rigl_core.export.formats import EXPORT_FORMATS
from rigl_core.spec import JobSpec, SparsitySpec
from service_common import tracing
from store.deletion import InUse, delete_job as delete_stored_job
from store.dispatch import dispatch
from store.idempotency import IdempotencyConflict
from store.jobs import TooManyActiveJobs, UploadGone
from store.metadata_filter import KEY_PATTERN as METADATA_KEY, MAX_FILTERS as MAX_METADATA_FILTERS
from store.object_store import is_store_outage
from store.quotas import QuotaExceeded
from store.spec_version import spec_body

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "cancelling", "requeued")
METHODS = typing.get_args(SparsitySpec.model_fields["method"].annotation)
MAX_EVENT_ID = 2**31 - 1  # event ids are 32-bit: a larger cursor is a 422, not a database overflow


def _job_or_404(ctx: Context, job_id: str):
    job = ctx.store.get_job(job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job


@router.post("", status_code=201)
def create_job(submission: JobSubmission, response: Response, ctx: Context = Depends(get_context),
               idempotency_key: str | None = Header(None, min_length=1, max_length=200)) -> dict:
    """Validate, store as `queued`, enqueue. The body is a JobSpec, optionally with `name`, `tags` and
    `metadata` (labels, stored beside the spec); unknown fields are rejected.

    With `Idempotency-Key`, the same key and body replay the first job; another body is a 422.
    """
    body = submission.model_dump(mode="json", exclude_unset=True)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    labels = {key: body.pop(key) for key in LABELS if key in body}  # body is now the JobSpec alone
    spec = submission.job_spec()
    if idempotency_key is not None:
        replay = _replay(ctx, idempotency_key, digest, response)
        if replay is not None:
            return replay
    cap = ctx.settings.max_active_jobs_per_owner
    if ctx.store.count_active(ctx.principal) >= cap:  # cheap early answer; create_job enforces it atomically
        raise _too_many_jobs(cap)
    resolved, total_steps, plan = resolve(spec, ctx.store, ctx.artifacts, ctx.settings, ctx.owner)
    try:
        job = ctx.store.create_job(body, resolved, total_steps, owner=ctx.principal,
                                   idempotency=(idempotency_key, digest) if idempotency_key else None, plan=plan,
                                   max_active=cap,
                                   dataset_id=spec.dataset.path if spec.dataset.name == "tensors" else None,
                                   weights_id=spec.model.weights, source_job_id=spec.model.init_from_job,
                                   artifacts_quota=limits(ctx)["artifacts"],
                                   trace_context=tracing.current_context(), **labels)
    except QuotaExceeded as exc:
        raise quota_error(exc, field=None) from None
    except IdempotencyConflict:
        return _replay(ctx, idempotency_key, digest, response)
    except TooManyActiveJobs:
        raise _too_many_jobs(cap) from None
    except UploadGone as exc:
        gone = {"model.weights": f"uploaded weights {spec.model.weights!r}",
                "model.init_from_job": f"job {spec.model.init_from_job!r} (deleted meanwhile)"
                }.get(exc.field, f"uploaded dataset {spec.dataset.path!r}")
        raise ApiError(422, "invalid_job", f"no {gone}", exc.field) from None
    if not dispatch(ctx.store, ctx.enqueue, job.id):  # stored and accepted; the reaper sends it later
        job = ctx.store.get_job(job.id)
    return job_json(job)


def _used_by(holder_id: str) -> str:
    return f"sweep {holder_id!r} (a held child)" if holder_id.startswith("sweep_") else f"job {holder_id!r}"


def _too_many_jobs(cap: int) -> ApiError:
    return ApiError(429, "too_many_jobs", f"at most {cap} queued or running jobs per owner; retry when one ends",
                    None, headers={"Retry-After": "30"})


def _replay(ctx: Context, key: str, digest: str, response: Response) -> dict | None:
    job = replayed(ctx, key, digest, response, ctx.store.get_job)
    return job_json(job) if job is not None else None


@router.get("")
def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, max_length=40),
              status: str | None = Query(None), tag: str | None = Query(None, pattern=TAG_PATTERN),
              name_prefix: str | None = Query(None, min_length=1, max_length=200), method: str | None = Query(None),
              ctx: Context = Depends(get_context)) -> dict:
    """Newest first, `limit` a page, `after` the last id of the previous page; the filters combine.

    `metadata.KEY=VALUE` (repeatable, at most 8): jobs whose metadata KEY (top level) is the string VALUE,
    or the integer or boolean spelled so (`metadata.epochs=5`, `metadata.ablation=true`)."""
    if status is not None and status not in STATUSES:
        raise ApiError(422, "invalid_request", f"status must be one of {', '.join(STATUSES)}", "status")
    if method is not None and method not in METHODS:
        raise ApiError(422, "invalid_request", f"method must be one of {', '.join(METHODS)}", "method")
    try:
        jobs, has_more = ctx.store.list_jobs(limit, after, status, ctx.owner, tag=tag, name_prefix=name_prefix,
                                             method=method, metadata=_metadata_filters(request))
    except KeyError:
        raise ApiError(422, "invalid_request", f"no job {after!r} to page after", "after") from None
    return {"object": "list", "data": [job_json(j, admin=ctx.owner is None) for j in jobs], "has_more": has_more}


def _metadata_filters(request: Request) -> list[tuple[str, str]]:
    """The `metadata.KEY=VALUE` query parameters, checked (422 naming the parameter)."""
    found = []
    for name, value in request.query_params.multi_items():
        if not name.startswith("metadata."):
            continue
        key = name.removeprefix("metadata.")
        if not METADATA_KEY.match(key):
            raise ApiError(422, "invalid_request", "a metadata filter's key is 1-64 of A-Z a-z 0-9 _ . : -", name)
        if not 1 <= len(value) <= 1024:
            raise ApiError(422, "invalid_request", "a metadata filter's value is 1-1024 characters", name)
        found.append((key, value))
    if len(found) > MAX_METADATA_FILTERS:
        raise ApiError(422, "invalid_request", f"at most {MAX_METADATA_FILTERS} metadata filters", "metadata")
    return found


@router.get("/{job_id}")
def get_job(job_id: str, ctx: Context = Depends(get_context)) -> Response:
    """The hottest route (clients poll it): one indexed lookup, pre-encoded JSON. A plain `def`: the
    lookup blocks (a locked table, a slow database), so it runs in the threadpool, never in the loop."""
    job = ctx.store.get_job_view(job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return Response(json.dumps(job_json(job, admin=ctx.owner is None)), media_type="application/json")


@router.patch("/{job_id}", openapi_extra={"requestBody": {"content": {MERGE_PATCH: {"schema": {
    "$ref": "#/components/schemas/LabelsPatch"}}}}})
def edit_labels(job_id: str, patch: LabelsPatch, ctx: Context = Depends(get_context)) -> dict:
    """Edit the job's `name`, `tags` and `metadata`, any job status. A JSON merge patch (RFC 7396; sent as
    application/merge-patch+json or application/json): a member left out stays, `null` removes it, `tags`
    is replaced whole, `metadata` is merged key by key (`null` deletes a key). The result obeys the
    submission's rules. The job's events get a `labels` event with what changed."""

    def new_values(job) -> dict:
        try:
            return changes(patch, job.meta)
        except ValueError as exc:
            raise from_value_error(exc, code="invalid_request") from None

    job = ctx.store.update_labels(job_id, ctx.owner, new_values)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job_json(job, admin=ctx.owner is None)


@router.post("/{job_id}/cancel", status_code=202)
def cancel_job(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    job = ctx.store.request_cancel(job_id, ctx.owner)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    return job_json(job, admin=ctx.owner is None)


@router.delete("/{job_id}", responses={202: {"description": "The job was running: it is being cancelled and is "
                                                             "deleted once its worker has stopped it."}})
def delete_job(job_id: str, response: Response, ctx: Context = Depends(get_context)) -> dict:
    """Delete a job with its events, checkpoints and artifacts. A finished or queued job is gone at once
    (200). A running one is cancelled and answered 202; it is deleted, with no further call, once its
    worker has stopped it (it shows `cancelling`, then 404). 409 while a queued or running job (or a
    sweep's held child) starts from this job's export (`model.init_from_job`). Of concurrent deletions
    of one job exactly one answers 200 `deleted: true`; the others answer as a repeated delete does, 404."""
    try:
        outcome = delete_stored_job(ctx.store, ctx.artifacts, job_id, ctx.owner)
    except InUse as exc:
        raise ApiError(409, "in_use", f"job {job_id!r} is started from by active {_used_by(exc.job_id)}; cancel "
                                      "it or wait for it to finish", "job_id") from None
    if outcome is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}", "job_id")
    if outcome == "deleted":
        return {"id": job_id, "object": "job", "deleted": True}
    response.status_code = 202
    return {"id": job_id, "object": "job", "deleted": False, "status": "cancelling",
            "message": "cancellation requested; the job and its artifacts are deleted once it has stopped"}


@router.get("/{job_id}/events")
def list_events(job_id: str, after: int = Query(0, ge=0, le=MAX_EVENT_ID), limit: int = Query(100, ge=1, le=1000),
                ctx: Context = Depends(get_context)) -> dict:
    _job_or_404(ctx, job_id)
    events = ctx.store.events.list_events(job_id, after, limit + 1)
    return {"object": "list", "data": [event_json(e) for e in events[:limit]], "has_more": len(events) > limit}


@router.get("/{job_id}/events/stream")
async def stream_events(job_id: str, request: Request, after: int = Query(0, ge=0, le=MAX_EVENT_ID),
                        last_event_id: str | None = Header(None, max_length=20),
                        ctx: Context = Depends(get_context)):
    """Server-sent events; reconnect with `Last-Event-ID` to resume. Ends when the job has ended, or
    after `stream_idle_seconds` without an event (reconnect to go on); idle streams get a `: keep-alive`
    comment every `stream_keepalive_seconds`. At most `max_streams_per_owner` open streams (429)."""
    await run_in_threadpool(_job_or_404, ctx, job_id)
    cursor = after
    if last_event_id:
        if not last_event_id.isdigit() or int(last_event_id) > MAX_EVENT_ID:
            raise ApiError(422, "invalid_request", "must be an event id", "Last-Event-ID")
        cursor = int(last_event_id)
    settings = ctx.settings
    hub, slots = _streams(request, ctx)
    if not slots.acquire(ctx.principal, settings.max_streams_per_owner):
        raise ApiError(429, "too_many_streams", f"at most {settings.max_streams_per_owner} open event streams "
                                                "per owner; close one first", None, headers={"Retry-After": "10"})
    released = False

    def release() -> None:  # from the generator's end or the response's end, whichever comes first
        nonlocal released
        if not released:
            released = True
            slots.release(ctx.principal)

    async def generate():
        nonlocal cursor
        loop = asyncio.get_running_loop()
        feed = hub.subscribe(job_id)
        last_event = last_write = loop.time()
        try:
            while True:
                changed = feed.changed  # taken before looking, so a change after the look still wakes us
                if feed.floor is not None and cursor < feed.floor:  # behind the feed's buffer: read the database
                    events = await run_in_threadpool(ctx.store.events.list_events, job_id, cursor, 500)
                    if not events:
                        cursor = feed.floor
                else:
                    events = feed.after(cursor) if feed.floor is not None else []
                if events:  # one write per batch, not per event: far fewer syscalls and browser wake-ups
                    cursor = events[-1].id
                    last_event = last_write = loop.time()
                    yield "".join(f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(event_json(e))}\n\n"
                                  for e in events)
                    continue
                if feed.ended and feed.floor is not None and cursor >= feed.floor:
                    return
                now = loop.time()
                if now - last_event >= settings.stream_idle_seconds:
                    return
                if now - last_write >= settings.stream_keepalive_seconds:
                    last_write = now
                    yield ": keep-alive\n\n"
                    continue
                wake = min(last_write + settings.stream_keepalive_seconds, last_event + settings.stream_idle_seconds)
                try:
                    await asyncio.wait_for(changed.wait(), timeout=max(0.0, wake - now))
                except TimeoutError:
                    pass
        finally:
            hub.unsubscribe(feed)
            release()

    return StreamingResponse(generate(), media_type="text/event-stream", background=BackgroundTask(release),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _streams(request: Request, ctx: Context) -> tuple[EventHub, StreamSlots]:
    """This app's event hub and stream counts, made on first use."""
    state = request.app.state
    if getattr(state, "event_hub", None) is None:
        state.event_hub = EventHub(ctx.store, ctx.settings.stream_poll_seconds)
        state.stream_slots = StreamSlots()
    return state.event_hub, state.stream_slots


@router.get("/{job_id}/metrics")
def metrics(job_id: str, max_points: int | None = Query(None, ge=10, le=100_000),
            ctx: Context = Depends(get_context)) -> dict:
    """Every curve of a job: training loss, evaluations, and per mask update its drop fraction, churn
    and exploration (the per-layer detail of updates stays in the event stream).

    Each series has at most `max_points` points (default and ceiling: the `max_metric_points` setting),
    thinned evenly with its first and last point kept; `points` gives each series' total and returned
    counts, and `thinned` says whether any was thinned."""
    job = _job_or_404(ctx, job_id)
    cap = min(max_points or ctx.settings.max_metric_points, ctx.settings.max_metric_points)
    found = ctx.store.events.series_events(job_id, ("metrics", "eval", "mask_update"), cap)
    series, points = {}, {}
    for kind, name in (("metrics", "train"), ("eval", "eval"), ("mask_update", "mask_updates")):
        events, total = found[kind]
        series[name] = [{k: v for k, v in (e.data or {}).items() if k != "layers"} if kind == "mask_update"
                        else e.data for e in events]
        points[name] = {"total": total, "returned": len(events)}
    return {"object": "metrics", "job_id": job.id, "latest": job.metrics, **series, "max_points": cap,
            "points": points, "thinned": any(p["total"] > p["returned"] for p in points.values())}


@router.get("/{job_id}/sparsity")
def sparsity(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    """The per-layer report: measured once the job succeeded, the plan (targets) before. The plan is the
    one measured at submission and stored with the job: reading it never builds the model. A job stored
    before plans were kept has its plan measured once, bounded as at submission, and stored."""
    job = _job_or_404(ctx, job_id)
    raw = ctx.artifacts.read_bytes(ctx.artifacts.job_key(job_id, "report.json")) if job.status == "succeeded" else None
    if raw is not None:
        report = json.loads(raw)
        return {"object": "sparsity", "job_id": job_id, "final": True, "layers": report["layers"],
                "totals": report["totals"], "leak_check": report["leak_check"]}
    plan = ctx.store.job_plan(job_id)
    if plan is None:
        plan = _measure_plan(ctx, JobSpec.model_validate(spec_body(job.resolved_spec)))
        ctx.store.set_job_plan(job_id, plan)
    return {"object": "sparsity", "job_id": job_id, "final": False, "layers": plan["layers"],
            "totals": plan["totals"]}


def _measure_plan(ctx: Context, spec: JobSpec) -> dict:
    """The plan of a job stored without one, measured as at submission (api/model_build.py)."""
    from rigl_core.data.describe import describe
    from rigl_core.models.registry import resolve_task
    from api.model_build import measure
    from api.submission import model_bounds

    model = spec.model.model_dump(mode="json")
    if spec.model.program is not None:  # the program fixes its shapes; this node's copy of its file
        from store.artifacts import MissingArtifact

        try:
            model["program"] = str(ctx.artifacts.fetch(spec.model.program))
        except MissingArtifact:
            raise ApiError(409, "not_ready", "the job's program has been deleted", "job_id") from None
        input_shape, num_classes = [], None
    else:
        shape = describe(spec.dataset)
        input_shape = shape.input_shape if shape else (spec.model.input_shape or [])
        num_classes = spec.model.num_classes or (shape.num_classes if shape else None)
        if not input_shape or num_classes is None:
            raise ApiError(409, "not_ready", "the report is available when the job has succeeded", "job_id")
    try:
        measured = measure(json.dumps(model, sort_keys=True), json.dumps(list(input_shape)), num_classes,
                           spec.sparsity.model_dump_json(), resolve_task(spec.training.task, spec.model.hf), None,
                           False, model_bounds(ctx.settings))
    except ValueError as exc:
        raise from_value_error(exc) from None
    return measured["plan"]


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, ctx: Context = Depends(get_context)) -> dict:
    _job_or_404(ctx, job_id)
    return {"object": "list", "data": [checkpoint_json(c) for c in ctx.store.checkpoints.list_checkpoints(job_id)],
            "has_more": False}


@router.get("/{job_id}/checkpoint")
def download_checkpoint(job_id: str, format: str = Query("dense", pattern=f"^({'|'.join(EXPORT_FORMATS)})$"),
                        ctx: Context = Depends(get_context)):
    """The final export: `dense` (state_dict with exact zeros), `packed` (values + bit masks), `compressed`
    (entropy-coded masks + values, rigl_core/export/compressed.py), `condensed` (constant fan-in layers as
    values + input indices, rigl_core/export/condensed.py; jobs with sparsity.structure fan-in) or `onnx`
    (the dense-with-zeros model).
    With a bucket it is streamed from the store, or, with `s3_presigned_downloads`, answered 307 to a
    presigned URL of the object (the bytes then never pass through the API)."""
    _job_or_404(ctx, job_id)
    row = ctx.store.checkpoints.latest_checkpoint(job_id, format)
    if row is None:
        raise ApiError(404, "not_found", f"job {job_id!r} has no {format} checkpoint yet", "format")
    artifacts, filename = ctx.artifacts, f"{job_id}-{row.filename}"
    headers = {"X-Content-SHA256": row.sha256, "ETag": f'"{row.sha256}"'}
    key = artifacts.job_key(job_id, row.filename)
    if not artifacts.remote:
        path = artifacts.job_file(job_id, row.filename)
        if not path.is_file():
            raise ApiError(404, "not_found", "the checkpoint file is missing", "format")
        return FileResponse(path, media_type="application/octet-stream", filename=filename, headers=headers)
    if ctx.settings.s3_presigned_downloads:
        url = artifacts.store.presigned_url(key, filename, ctx.settings.s3_presign_seconds)
        return RedirectResponse(url, status_code=307, headers={**headers, "Cache-Control": "no-store"})
    try:
        size, chunks = artifacts.open_chunks(key)
    except FileNotFoundError:
        raise ApiError(404, "not_found", "the checkpoint file is missing", "format") from None
    except Exception as error:
        if not is_store_outage(error):
            raise
        raise ApiError(503, "storage_unavailable", "the artifact store is unavailable; retry later", None,
                       headers={"Retry-After": "30"}) from None
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={**headers, "Content-Length": str(size),
                                      "Content-Disposition": f'attachment; filename="{filename}"'})
