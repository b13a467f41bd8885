"""Deleting what users store: jobs (rows and artifacts), uploads, and what nobody needs any more.

Storage must not grow without bound. A job is deleted with everything that refers to it: its
artifact directory and every row with its `job_id` (events, checkpoints, idempotency records, …).
A job that is still running is cancelled first and marked pending deletion; the API's cleanup
pass (`clean_up`) purges it once its worker has stopped it, so a user deletes in one call.
Files go before rows, and the pending-deletion mark before both, so a purge that is interrupted
is finished by the next cleanup pass rather than leaving files nobody can reach.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from store.artifacts import ID_PATTERN, Artifacts
from store.db import (ArchitectureRecord, Base, Checkpoint, DatasetRecord, Event, Job, PendingDeletion, Sweep,
                      WeightsRecord, utcnow)
from store.job_state import ACTIVE, CLAIMABLE, TERMINAL
from store.jobs import JobStore
from store.uploads import program_of

log = logging.getLogger("rigl.deletion")


class InUse(Exception):
    """An upload an active job still reads; `job_id` names that job."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


# ---------------------------------------------------------------------------------------------- jobs
def delete_job(store: JobStore, artifacts: Artifacts, job_id: str, owner: str | None = None) -> str | None:
    """`DELETE /v1/jobs/{id}`. Returns None (no such job for this owner, or another call deleted it
    meanwhile: exactly one of concurrent deletions answers "deleted"), "deleted" (gone now), or
    "pending" (it was running: cancellation was requested and the cleanup pass deletes it once it
    stopped). InUse: an active job (or a sweep's held child) starts from this job's export
    (`model.init_from_job`), as uploaded weights in use are refused.

    Every transaction here takes the owner's lock row, then the job row (FOR UPDATE), before any other
    row, so concurrent deletions queue on the job instead of deadlocking on its child rows."""
    if not ID_PATTERN.match(job_id):  # never issued by us (and a NUL byte is an error in PostgreSQL)
        return None
    with store.sessions() as s:
        query = select(Job.owner).where(Job.id == job_id)
        job_owner = s.scalar(query.where(Job.owner == owner) if owner is not None else query)
    if job_owner is None:
        return None
    for _ in range(10):  # compare-and-set on the status: a worker may finish the job meanwhile
        with store.sessions.begin() as s:
            store.lock_owners(s, [job_owner])  # a job submitted from this one commits before, or finds it gone
            status = s.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
            if status is None:
                return None
            _refuse_if_started_from(s, job_id)
            _mark_pending(store, s, job_id)
            if status not in TERMINAL:
                new = "cancelled" if status in CLAIMABLE else "cancelling"
                values = {"status": new, "cancel_requested": True}
                if new == "cancelled":
                    values.update(finished_at=utcnow(), lease_token=None)
                if s.execute(update(Job).where(Job.id == job_id, Job.status == status).values(**values)).rowcount != 1:
                    continue
                message = ("cancelled before it started; deleting" if new == "cancelled" else
                           "cancellation requested; the job is deleted once it has stopped")
                s.add(Event(job_id=job_id, type="status", message=message, data={"status": new}))
                status = new
        break
    else:
        return "pending"
    if status not in TERMINAL:
        return "pending"
    outcome = _purge(store, artifacts, job_id)
    return {"deleted": "deleted", "gone": None}.get(outcome, "pending")


def purge_job(store: JobStore, artifacts: Artifacts, job_id: str) -> bool:
    """Remove a finished job's files, then all its rows (or what an interrupted purge left of them).
    False (nothing done) when it is not finished."""
    return _purge(store, artifacts, job_id) != "busy"


def _purge(store: JobStore, artifacts: Artifacts, job_id: str) -> str:
    """"deleted": this call removed the job row; "gone": there was none (another call removed it; any
    leftover rows are removed); "busy": the job is not finished, or a row referring to it was written
    meanwhile (the next cleanup pass finishes it). Each transaction locks the job row first."""
    with store.sessions.begin() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
        if status is not None and status not in TERMINAL:
            return "busy"
        if status is not None:
            _mark_pending(store, s, job_id)
    artifacts.remove_job_dir(job_id)
    try:
        with store.sessions.begin() as s:
            s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
            for table in reversed(Base.metadata.sorted_tables):  # children before the job row
                if "job_id" in table.c and table.name != Job.__tablename__:
                    s.execute(delete(table).where(table.c.job_id == job_id))
            removed = s.execute(delete(Job).where(Job.id == job_id)).rowcount == 1
    except IntegrityError:  # a row referring to it was written meanwhile: the next cleanup pass finishes it
        log.warning("job %s: deletion deferred to the next cleanup pass", job_id)
        return "busy"
    return "deleted" if removed else "gone"


def started_from(resolved_spec: dict | None, spec: dict | None, job_id: str) -> bool:
    """Whether a job (its submitted and resolved specs) starts from `job_id`'s export: the submitted
    `model.init_from_job`, or the resolved `model.weights` key under that job's artifacts."""
    source = ((spec or {}).get("model") or {}).get("init_from_job")
    weights = ((resolved_spec or {}).get("model") or {}).get("weights")
    return source == job_id or (isinstance(weights, str) and weights.startswith(f"jobs/{job_id}/"))


def _refuse_if_started_from(session, job_id: str) -> None:
    """InUse naming the first active job, or held sweep child (its sweep), that starts from `job_id`."""
    for dependant, spec, resolved in session.execute(select(Job.id, Job.spec, Job.resolved_spec)
                                                     .where(Job.status.in_(ACTIVE)).order_by(Job.seq)):
        if started_from(resolved, spec, job_id):
            raise InUse(dependant)
    for sweep_id, held in session.execute(select(Sweep.id, Sweep.held).where(Sweep.status == "active",
                                                                             Sweep.held_count > 0)):
        if any(started_from(entry.get("resolved"), entry.get("spec"), job_id) for entry in held or []):
            raise InUse(sweep_id)


def _mark_pending(store: JobStore, session, job_id: str) -> None:
    insert = pg_insert if store.engine.dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(PendingDeletion).values(job_id=job_id, requested_at=utcnow())
                    .on_conflict_do_nothing(index_elements=[PendingDeletion.job_id]))


# ---------------------------------------------------------------------------------------------- uploads
def delete_dataset(store: JobStore, artifacts: Artifacts, dataset_id: str, owner: str | None = None) -> bool:
    """False: no such dataset for this owner. InUse: an active job reads it. A finished job no longer
    needs the file. Under the owner's lock, so a job being submitted against it either is seen here or
    finds the dataset gone (JobStore.create_job)."""
    row = store.uploads.get_dataset(dataset_id, owner) if ID_PATTERN.match(dataset_id) else None
    if row is None:
        return False
    with store.sessions.begin() as s:
        store.lock_owners(s, [row.owner])
        _refuse_if_used(s, lambda spec: spec.get("dataset", {}).get("name") == "tensors"
                        and spec["dataset"].get("path") == dataset_id)
        if s.execute(delete(DatasetRecord).where(DatasetRecord.id == dataset_id)).rowcount != 1:
            return False
    artifacts.remove(artifacts.dataset_key(dataset_id, row.format))
    return True


def delete_weights(store: JobStore, artifacts: Artifacts, weights_id: str, owner: str | None = None) -> bool:
    """As delete_dataset, for uploaded weights: InUse while an active job starts from them (a running
    job reloads them when it resumes)."""
    row = store.uploads.get_weights(weights_id, owner) if ID_PATTERN.match(weights_id) else None
    if row is None:
        return False
    with store.sessions.begin() as s:
        store.lock_owners(s, [row.owner])
        _refuse_if_used(s, lambda spec: (spec.get("model") or {}).get("weights") == weights_id)
        if s.execute(delete(WeightsRecord).where(WeightsRecord.id == weights_id)).rowcount != 1:
            return False
    artifacts.remove(artifacts.weights_key(weights_id))
    return True


def delete_architecture(store: JobStore, artifacts: Artifacts, architecture_id: str, owner: str | None = None
                        ) -> bool:
    """False: no such architecture for this owner. InUse: an active job was submitted with it (every job
    keeps its own resolved copy of declarative layers, so finished ones are unaffected; an uploaded
    program's file goes with its record, and a running job that resumes reads it)."""
    row = store.uploads.get_architecture(architecture_id, owner) if ID_PATTERN.match(architecture_id) else None
    if row is None:
        return False
    with store.sessions.begin() as s:
        store.lock_owners(s, [row.owner])
        _refuse_if_used(s, lambda spec: architecture_id in ((spec.get("model") or {}).get("name"),
                                                            (spec.get("model") or {}).get("program")))
        if s.execute(delete(ArchitectureRecord).where(ArchitectureRecord.id == architecture_id)).rowcount != 1:
            return False
    if program_of(row) is not None:
        artifacts.remove(artifacts.program_key(architecture_id))
    return True


def _refuse_if_used(session, uses) -> None:
    for job_id, spec in session.execute(select(Job.id, Job.spec).where(Job.status.in_(ACTIVE)).order_by(Job.seq)):
        if isinstance(spec, dict) and uses(spec):
            raise InUse(job_id)


# ---------------------------------------------------------------------------------------------- cleanup
def discard_resume_checkpoint(store: JobStore, artifacts: Artifacts, job_id: str) -> bool:
    """A finished job (succeeded, failed or cancelled) can never resume: drop its resume checkpoint,
    file then row. Safe to call from the worker right after `Leases.finish`."""
    with store.sessions() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
        names = list(s.scalars(select(Checkpoint.filename).where(Checkpoint.job_id == job_id,
                                                                 Checkpoint.kind == "resume")))
    if status not in TERMINAL or not names:
        return False
    folder = artifacts.root / "jobs" / job_id
    older = [p.name for p in folder.glob("resume*")] if folder.is_dir() and not folder.is_symlink() else []
    if artifacts.remote:  # and those in the bucket (written by any worker)
        older += artifacts.list_job(job_id, "resume")
    for name in set(names) | set(older):  # the recorded one, earlier ones and temp files of any attempt
        artifacts.remove(artifacts.job_key(job_id, name))
    with store.sessions.begin() as s:
        s.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == "resume"))
    return True


def clean_up(store: JobStore, artifacts: Artifacts, retention_days: float | None = None, batch: int = 100) -> dict:
    """One pass of the API's cleanup: finish pending deletions, drop the resume checkpoints of finished
    jobs, delete finished jobs past `retention_days`. Returns what it did, by kind."""
    done = {"deleted": [], "resume_discarded": [], "expired": []}
    with store.sessions() as s:
        pending = list(s.execute(select(PendingDeletion.job_id, Job.status)
                                 .join(Job, Job.id == PendingDeletion.job_id, isouter=True).limit(batch)))
        finished_with_resume = list(s.scalars(
            select(Checkpoint.job_id).join(Job, Job.id == Checkpoint.job_id)
            .where(Checkpoint.kind == "resume", Job.status.in_(TERMINAL)).distinct().limit(batch)))
        expired = []
        if retention_days is not None:
            cutoff = utcnow() - dt.timedelta(days=retention_days)
            expired = list(s.scalars(select(Job.id).where(Job.status.in_(TERMINAL), Job.finished_at < cutoff)
                                     .order_by(Job.seq).limit(batch)))
    for job_id, status in pending:
        if status in CLAIMABLE:  # requeued (its worker was lost) after the deletion was asked for
            if delete_job(store, artifacts, job_id) == "deleted":
                done["deleted"].append(job_id)
        elif (status is None or status in TERMINAL) and purge_job(store, artifacts, job_id):
            done["deleted"].append(job_id)
    for job_id in finished_with_resume:
        if discard_resume_checkpoint(store, artifacts, job_id):
            done["resume_discarded"].append(job_id)
    for job_id in expired:
        if purge_job(store, artifacts, job_id):
            done["expired"].append(job_id)
    return done
