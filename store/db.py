"""Tables: jobs, job_tags, events (monotonic ids), checkpoints, architectures, datasets, weights, sweeps,
webhooks and their deliveries.

The schema is made and changed by the migrations in store/migrations (never create_all): every model
change comes with a revision there, and tests/test_migrations.py fails when the two differ. Opening a
database (and bringing its schema to head) is store/engine.py's job, so the migrations can import these
models without a loop."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, false, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def db_now(session) -> dt.datetime:
    """The database's clock (aware UTC): leases are written and judged by one clock, whatever the
    clocks of the API and worker machines say. PostgreSQL's clock_timestamp(); SQLite's 'now' (its
    clock is the machine's, which the API and worker of an embedded setup share)."""
    if session.get_bind().dialect.name == "sqlite":
        value = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
    value = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    return value.astimezone(dt.timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True, default=lambda: new_id("job"))
    owner: Mapped[str] = mapped_column(String(64), default="local", index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    spec: Mapped[dict] = mapped_column(JSON)  # as submitted
    resolved_spec: Mapped[dict] = mapped_column(JSON)  # uploads resolved to server paths
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    # fewest devices a worker must own to run it: training.devices, 1 for "all" (any worker, on all of its own)
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # runs started, resumptions included
    # runs that ended in a clean checkpoint-and-requeue (SIGTERM, warm shutdown): they don't count
    # against max_attempts; a run that died without one (found by the reaper) does
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:pid of the current holder
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    preempt_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # worker stopping
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # latest train/eval metrics
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # summary of the final report
    # what the user calls it: `name`, `tags` (as submitted, for display; JobTag rows are what the tag filter
    # reads) and free `metadata` (column `meta`: `metadata` is SQLAlchemy's); bounded at submit (api/schemas.py)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    tags: Mapped[list | None] = mapped_column(JSON, nullable=True)
    meta: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)  # sparsity.method, for the list filter
    sweep_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)  # store/sweeps.py
    # the sparsity plan (per-layer rows and totals) measured at submission, which GET /v1/jobs/{id}/sparsity
    # serves until the job's report exists: reads never rebuild the model (revision 0009). Deferred: only that
    # route reads it (JobStore.job_plan).
    plan: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True, deferred=True)
    # the W3C trace context of the submitting request, continued by the worker's runs (service_common/tracing.py)
    trace_context: Mapped[dict | None] = mapped_column(JSON, nullable=True)


Index("ix_jobs_owner_status", Job.owner, Job.status)  # the per-owner active-job count is index-only
Index("ix_jobs_owner_method", Job.owner, Job.method)
# keyset pages newest first (an owner's, a status filter's) and the claim's max(started_at) per owner: index walks
# at 100,000 jobs (bench/scale.py; revision 0006)
Index("ix_jobs_owner_seq", Job.owner, Job.seq)
Index("ix_jobs_status_seq", Job.status, Job.seq)
Index("ix_jobs_owner_started", Job.owner, Job.started_at)


class JobTag(Base):
    """One row per (job, tag): `GET /v1/jobs?tag=` is an index lookup on both SQLite and PostgreSQL,
    where a JSON column would need each dialect's own JSON operators and a scan."""

    __tablename__ = "job_tags"

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)


Index("ix_job_tags_tag", JobTag.tag, JobTag.job_id)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"))  # ix_events_job_id_id
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    type: Mapped[str] = mapped_column(String(16))  # status | metrics | eval | mask_update | checkpoint | message
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


# a stream's cursor (job_id = ? AND id > ? ORDER BY id) and a job's newest event id: one index walk
Index("ix_events_job_id_id", Event.job_id, Event.id)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ckpt"))
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # resume | dense | packed
    step: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(200))  # inside the job's artifact directory
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)  # bytes: files over 2 GiB
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ArchitectureRecord(Base):
    __tablename__ = "architectures"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("arch"))
    owner: Mapped[str] = mapped_column(String(64), default="local", index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict] = mapped_column(JSON)
    params: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    owner: Mapped[str] = mapped_column(String(64), default="local", index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # npz | safetensors
    size: Mapped[int] = mapped_column(BigInteger)  # bytes: files over 2 GiB
    sha256: Mapped[str] = mapped_column(String(64))
    num_samples: Mapped[int] = mapped_column(Integer)
    num_val: Mapped[int] = mapped_column(Integer, default=0)
    input_shape: Mapped[list] = mapped_column(JSON)
    num_classes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WeightsRecord(Base):
    """An uploaded safetensors state_dict a job can start from (`model.weights: "w_…"`)."""

    __tablename__ = "weights"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("w"))
    owner: Mapped[str] = mapped_column(String(64), default="local", index=True)
    name: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)  # bytes: files over 2 GiB
    sha256: Mapped[str] = mapped_column(String(64))
    tensors: Mapped[int] = mapped_column(Integer)  # entries of the state_dict
    params: Mapped[int] = mapped_column(BigInteger)  # values over all of them (7B: over 2^31)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # {name: [dtype, shape]} from the header, parsed once at upload: a job's submission checks the model
    # against it instead of re-reading the file (deferred: lists don't load it; None before revision 0008)
    tensor_index: Mapped[dict | None] = mapped_column(JSON, nullable=True, deferred=True)


class Sweep(Base):
    """A grid of jobs over one base spec (store/sweeps.py). Children past the owner's active-job cap wait
    in `held` (the specs, already validated and resolved) and become jobs as the owner's jobs finish."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("sweep"))
    owner: Mapped[str] = mapped_column(String(64), default="local", index=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | cancelled
    base: Mapped[dict] = mapped_column(JSON)  # the base JobSpec as submitted
    grid: Mapped[dict] = mapped_column(JSON)  # axis -> values, as validated
    children: Mapped[int] = mapped_column(Integer)  # grid size: jobs created + held
    held: Mapped[list] = mapped_column(JSON)  # children not created yet, in grid order
    held_count: Mapped[int] = mapped_column(Integer, default=0)  # len(held), for an indexed release query
    # strategy random/optuna: budget, ranges, pruner, and optuna's trial of each child (store/search.py);
    # None: a grid
    search: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


Index("ix_sweeps_held", Sweep.status, Sweep.held_count)


class ApiKey(Base):
    """An API key: only the SHA-256 of its secret is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class IdempotencyRecord(Base):
    """`Idempotency-Key` on job creation: the same key and body replay the job, another body is refused."""

    __tablename__ = "idempotency"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OwnerLock(Base):
    """One row per owner, written first in any transaction that must see the owner's jobs exactly
    (the active-job cap, deleting an upload): the row lock on PostgreSQL, the write lock on SQLite,
    serialises them, so count-then-insert can't overshoot."""

    __tablename__ = "owner_locks"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    touched_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PendingDeletion(Base):
    """`DELETE /v1/jobs/{id}` of a job that is still running: it is cancelled, and its rows and files
    are removed by the API's cleanup pass once it has stopped. Also written before any purge, so an
    interrupted purge is finished by the next pass."""

    __tablename__ = "pending_deletions"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Webhook(Base):
    """An owner's endpoint for job and sweep state changes (store/webhooks.py). The secret signs each body
    (HMAC-SHA256): it is kept as given (the sender needs it) and shown only once, at creation."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("wh"))
    owner: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(80))
    events: Mapped[list | None] = mapped_column(JSON, nullable=True)  # event types it wants; None: all
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint: written in the transaction of the change it reports (the outbox), sent and
    retried by the API's webhook sender; `log` holds each attempt (status code, error, duration)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    # no foreign key: deleting an endpoint must never fail a job's status change that is writing its delivery
    webhook_id: Mapped[str] = mapped_column(String(40))  # ix_webhook_deliveries_hook
    event_id: Mapped[str] = mapped_column(String(40))  # the same for every endpoint of one event (dedupe)
    event_type: Mapped[str] = mapped_column(String(40))  # job.succeeded, sweep.finished, …
    payload: Mapped[str] = mapped_column(Text)  # the exact body sent, so every retry is signed the same
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    log: Mapped[list] = mapped_column(JSON, default=list)


Index("ix_webhook_deliveries_due", WebhookDelivery.status, WebhookDelivery.next_attempt_at)  # the sender's pass
Index("ix_webhook_deliveries_hook", WebhookDelivery.webhook_id, WebhookDelivery.created_at)  # an endpoint's log
