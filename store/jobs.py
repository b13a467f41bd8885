"""The job store: the database the API and the worker share, and the job rows themselves.

`JobStore` opens the database and groups its parts, each a concern of its own on the same engine:
`claims` (which job a worker's message starts, store/claims.py), `leases` (a running job's lease,
heartbeats, its end, store/leases.py), `events` (store/events.py), `checkpoints` (store/checkpoints.py),
`uploads` (store/uploads.py) and `idempotency` (store/idempotency.py). The job rows (create, read, list,
cancel, dispatch marks) are its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

from sqlalchemy import bindparam, case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from store import quotas, webhooks
from store.artifacts import issued_id
from store.checkpoints import Checkpoints
from store.claims import Claims
from store.db import DatasetRecord, Event, Job, JobTag, PendingDeletion, WeightsRecord, utcnow
from store.engine import make_engine, make_sessionmaker
from store.events import EventLog
from store.idempotency import Idempotency, IdempotencyConflict, check_unused, remember
from store.job_state import (ACTIVE, CLAIMABLE, TERMINAL, UNDISPATCHED, WAITING_FOR_DEVICES, lock_job_events,
                             lock_owners, write_lock)
from store.leases import Leases
from store.metadata_filter import metadata_equals
from store.settings import Settings
from store.spec_version import stamped
from store.uploads import Uploads


# a job row's columns for the read-only snapshots, without the stored plan (only the sparsity route reads it)
ROW_COLUMNS = tuple(column for column in Job.__table__.c if column.name != "plan")


class TooManyActiveJobs(Exception):
    """The owner already has `max_active` queued or running jobs."""

    def __init__(self, max_active: int):
        super().__init__(f"at most {max_active} queued or running jobs per owner")
        self.max_active = max_active


class UploadGone(Exception):
    """An upload the job refers to was deleted while the job was being submitted; `field` names it."""

    def __init__(self, field: str):
        super().__init__(field)
        self.field = field


class JobStore:
    def __init__(self, database_url: str, settings: Settings | None = None):
        """`settings`: the database's pool sizes and upgrade rule (None: from the environment)."""
        self.engine = make_engine(database_url, settings)
        self.sessions: sessionmaker = make_sessionmaker(self.engine)
        webhooks.install(self.sessions)  # status changes write their webhook deliveries (the outbox)
        parts = (self.engine, self.sessions)
        self.claims, self.leases, self.events = Claims(*parts), Leases(*parts), EventLog(*parts)
        self.checkpoints, self.uploads, self.idempotency = Checkpoints(*parts), Uploads(*parts), Idempotency(*parts)

    def create_job(self, spec: dict, resolved_spec: dict, total_steps: int, owner: str = "local",
                   idempotency: tuple[str, str] | None = None, max_active: int | None = None,
                   dataset_id: str | None = None, weights_id: str | None = None, source_job_id: str | None = None,
                   name: str | None = None,
                   tags: list[str] | None = None, metadata: dict | None = None,
                   artifacts_quota: quotas.Quota | None = None, plan: dict | None = None,
                   trace_context: dict | None = None) -> Job:
        """`idempotency` = (key, body hash): stored in the same transaction as the job, so two racing
        requests with one key create one job (the loser gets IdempotencyConflict and replays).

        `max_active`: the owner's active-job cap, counted and enforced inside the creating transaction
        after taking the owner's lock row (TooManyActiveJobs), so concurrent submissions can't overshoot.
        `dataset_id`: an uploaded dataset the job reads; it must still exist under its owner's lock, so a
        concurrent `DELETE /v1/datasets/{id}` either sees this job or makes this one fail (UploadGone).
        `weights_id`: the same for uploaded weights (`model.weights`), and `source_job_id` for the job whose
        export it starts from (`model.init_from_job`: a concurrent `DELETE /v1/jobs/{id}` of it either sees
        this job and answers 409, or makes this one fail).
        `name`, `tags`, `metadata`: the user's labels (validated by the caller); tags also get JobTag rows.
        `artifacts_quota`: the owner's job-artifacts quota (store/quotas.py), checked under the same lock
        (QuotaExceeded). `plan`: the sparsity plan measured at submission (api/submission.py), kept for
        GET /v1/jobs/{id}/sparsity. `trace_context`: the submitting request's W3C trace context (tracing on),
        which the worker's runs of the job continue (service_common/tracing.py)."""
        try:
            with self.sessions.begin() as s:
                owners = {owner}
                if dataset_id is not None:
                    owners.add(s.scalar(select(DatasetRecord.owner).where(DatasetRecord.id == dataset_id)) or owner)
                if weights_id is not None:
                    owners.add(s.scalar(select(WeightsRecord.owner).where(WeightsRecord.id == weights_id)) or owner)
                if source_job_id is not None:
                    owners.add(s.scalar(select(Job.owner).where(Job.id == source_job_id)) or owner)
                self.lock_owners(s, owners)
                check_unused(s, owner, idempotency)
                if max_active is not None and count_active_in(s, owner) >= max_active:
                    raise TooManyActiveJobs(max_active)
                if artifacts_quota is not None:
                    quotas.check(s, owner, "artifacts", artifacts_quota, adding_bytes=0)
                if dataset_id is not None and s.get(DatasetRecord, dataset_id) is None:
                    raise UploadGone("dataset.path")
                if weights_id is not None and s.get(WeightsRecord, weights_id) is None:
                    raise UploadGone("model.weights")
                if source_job_id is not None and not source_job_kept(s, source_job_id):
                    raise UploadGone("model.init_from_job")
                job = self.add_job_rows(s, spec, resolved_spec, total_steps, owner, name, tags, metadata, plan=plan,
                                        trace_context=trace_context)
                remember(s, owner, idempotency, job.id)
        except IntegrityError:
            if idempotency is None:
                raise
            raise IdempotencyConflict() from None
        return job

    @staticmethod
    def add_job_rows(session, spec: dict, resolved_spec: dict, total_steps: int, owner: str, name: str | None = None,
                     tags: list[str] | None = None, metadata: dict | None = None, sweep_id: str | None = None,
                     plan: dict | None = None, trace_context: dict | None = None) -> Job:
        """The rows of one new queued job, in the caller's transaction (which holds the owner's lock and has
        checked the cap): create_job's, and a sweep's release of held children (store/sweeps.py)."""
        tags = list(dict.fromkeys(tags or []))  # once each, in the order given
        # the stored spec carries its spec_version (store/spec_version.py)
        job = Job(spec=spec, resolved_spec=stamped(resolved_spec), total_steps=total_steps, owner=owner,
                  devices=required_devices(resolved_spec), name=name, tags=tags or None, meta=metadata,
                  method=(resolved_spec.get("sparsity") or {}).get("method"), sweep_id=sweep_id, plan=plan,
                  trace_context=trace_context)
        session.add(job)
        session.flush()
        session.add_all(JobTag(job_id=job.id, tag=tag) for tag in tags)
        session.add(Event(job_id=job.id, type="status", message="queued", data={"status": "queued"}))
        return job

    @staticmethod
    def lock_owners(session, owners: Iterable[str]) -> None:
        """store/job_state.lock_owners: the owners' lock rows, for the callers that hold the store."""
        lock_owners(session, owners)

    def count_active(self, owner: str) -> int:
        with self.sessions() as s:
            return count_active_in(s, owner)

    def job_plan(self, job_id: str) -> dict | None:
        """The sparsity plan stored at submission; None for jobs stored before revision 0009 (or whose
        classes only the worker knows)."""
        with self.sessions() as s:
            return s.scalar(select(Job.plan).where(Job.id == job_id))

    def set_job_plan(self, job_id: str, plan: dict) -> None:
        """Keep a plan measured after submission (an older job's, once), so it is measured only once."""
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.plan.is_(None)).values(plan=plan))

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        if not issued_id(job_id):
            return None
        with self.sessions() as s:
            query = select(Job).where(Job.id == job_id)
            if owner is not None:
                query = query.where(Job.owner == owner)
            return s.scalars(query).first()

    _VIEW = select(*ROW_COLUMNS).where(Job.id == bindparam("job_id"))

    def get_job_view(self, job_id: str, owner: str | None = None) -> SimpleNamespace | None:
        """A read-only snapshot of the row with a precompiled Core query: 3× cheaper than the ORM,
        for the status poll every client makes."""
        if not issued_id(job_id):
            return None
        with self.engine.connect() as connection:
            row = connection.execute(self._VIEW, {"job_id": job_id}).mappings().first()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return SimpleNamespace(**row)

    def list_jobs(self, limit: int = 20, after: str | None = None, status: str | None = None,
                  owner: str | None = None, tag: str | None = None, name_prefix: str | None = None,
                  method: str | None = None, metadata: Iterable[tuple[str, str]] = ()
                  ) -> tuple[list[SimpleNamespace], bool]:
        """Newest first, as read-only snapshots of the rows (a third cheaper than ORM objects); `after` is the id
        of the last job of the previous page. The filters combine (AND); `name_prefix` is case-sensitive on
        both databases (SQLite's LIKE is not, hence substr); `metadata`: (key, value) pairs, each a
        store/metadata_filter.py match."""
        with self.sessions() as s:
            query = select(*ROW_COLUMNS).order_by(Job.seq.desc())  # rows as snapshots, as get_job_view: no ORM
            if owner is not None:
                query = query.where(Job.owner == owner)
            if status:
                query = query.where(Job.status == status)
            if tag:
                query = query.where(Job.id.in_(select(JobTag.job_id).where(JobTag.tag == tag)))
            if name_prefix:
                query = query.where(func.substr(Job.name, 1, len(name_prefix)) == name_prefix)
            if method:
                query = query.where(Job.method == method)
            for key, value in metadata:
                query = query.where(metadata_equals(Job.meta, self.engine.dialect.name, key, value))
            if after:
                if not issued_id(after):
                    raise KeyError(after)
                anchor_query = select(Job.seq).where(Job.id == after)
                if owner is not None:  # another owner's id is as good as a missing one: no existence oracle
                    anchor_query = anchor_query.where(Job.owner == owner)
                anchor = s.scalars(anchor_query).first()
                if anchor is None:
                    raise KeyError(after)
                query = query.where(Job.seq < anchor)
            rows = [SimpleNamespace(**row) for row in s.execute(query.limit(limit + 1)).mappings()]
        return rows[:limit], len(rows) > limit

    def update_labels(self, job_id: str, owner: str | None, changes: Callable[[Job], dict]) -> Job | None:
        """Edit a job's name, tags and metadata in one transaction with the job row locked: `changes(job)`
        returns the new values of the labels to set (it may raise, and nothing is written). A `labels`
        event records what changed. None: no such job for this owner (deleted, or another owner's)."""
        if not issued_id(job_id):
            return None
        with self.sessions.begin() as s:
            write_lock(s)  # SQLite: read-merge-write is atomic (PostgreSQL: the row lock below)
            query = select(Job).where(Job.id == job_id).with_for_update()
            if owner is not None:
                query = query.where(Job.owner == owner)
            job = s.scalars(query).first()
            if job is None:
                return None
            new = changes(job)
            current = {"name": job.name, "tags": job.tags or [], "metadata": job.meta or {}}
            changed = {key: value for key, value in new.items() if value != current[key]}
            if "name" in changed:
                job.name = changed["name"]
            if "metadata" in changed:
                job.meta = changed["metadata"] or None
            if "tags" in changed:
                job.tags = changed["tags"] or None
                s.execute(delete(JobTag).where(JobTag.job_id == job_id))
                s.add_all(JobTag(job_id=job_id, tag=tag) for tag in changed["tags"])
            if changed:
                lock_job_events(s, job_id)
                s.add(Event(job_id=job_id, type="labels", message="labels changed: " + ", ".join(changed),
                            data=changed))
        return job

    def request_cancel(self, job_id: str, owner: str | None = None) -> Job | None:
        """Conditional UPDATEs (`WHERE status …`), never read-then-write: on SQLite the read is not in the
        write transaction, so a worker's `succeeded` committed in between would be overwritten."""
        if not issued_id(job_id):
            return None
        owned = [Job.id == job_id] + ([Job.owner == owner] if owner is not None else [])
        steps = ((CLAIMABLE, "cancelled", "cancelled before it started"),
                 (("running",), "cancelling", "cancellation requested"),
                 (("cancelling",), None, None))  # asked again: keep the flag, no second event
        with self.sessions.begin() as s:
            for current, status, message in steps:
                values = {"cancel_requested": True}
                if status is not None:
                    values["status"] = status
                if status == "cancelled":  # it waits for nothing any more
                    waiting = Job.error_code == WAITING_FOR_DEVICES
                    values.update(error_code=case((waiting, None), else_=Job.error_code),
                                  error_message=case((waiting, None), else_=Job.error_message))
                if status in TERMINAL:
                    values["finished_at"] = utcnow()
                result = s.execute(update(Job).where(*owned, Job.status.in_(current)).values(**values))
                if result.rowcount == 1:
                    if status is not None:
                        lock_job_events(s, job_id)
                        s.add(Event(job_id=job_id, type="status", message=message, data={"status": status}))
                    break
        return self.get_job(job_id, owner)

    # ------------------------------------------------------------------ dispatch (store/dispatch.py)
    def mark_undispatched(self, job_id: str, reason: str) -> None:
        """Its message could not be sent: it waits in the database, visibly, until the reaper sends it."""
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status.in_(CLAIMABLE))
                      .values(error_code=UNDISPATCHED, error_message=reason))

    def mark_dispatched(self, job_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.error_code == UNDISPATCHED)
                      .values(error_code=None, error_message=None))

    def undispatched_jobs(self, limit: int = 100) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Job.id).where(Job.status.in_(CLAIMABLE), Job.error_code == UNDISPATCHED)
                                  .order_by(Job.seq).limit(limit)))

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")


def count_active_in(session, owner: str) -> int:
    """The owner's queued and running jobs, in the caller's transaction (after the owner's lock: exact)."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status.in_(ACTIVE))) or 0


def source_job_kept(session, job_id: str) -> bool:
    """Whether a job another starts from (`model.init_from_job`) is still there and not being deleted."""
    return (session.scalar(select(Job.status).where(Job.id == job_id)) == "succeeded"
            and session.get(PendingDeletion, job_id) is None)


def required_devices(spec: dict) -> int:
    """The fewest devices a worker must own to run a job: `training.devices`, or 1 for "all" (any worker
    runs it, on all of its own devices). A job on several nodes (`training.nodes` > 1) trains on the Ray
    cluster; the worker only supervises it, so any worker can (1)."""
    training = spec.get("training") or {}
    nodes = training.get("nodes", 1)
    if isinstance(nodes, int) and not isinstance(nodes, bool) and nodes > 1:
        return 1
    value = training.get("devices", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1
