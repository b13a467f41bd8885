"""JobStore: every read and write the API and the worker make, as short transactions.

Claiming is a compare-and-set on the job row with a fresh lease token, so a duplicate delivery of
the same message finds nothing to claim and exits at once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from types import SimpleNamespace

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from store.db import (ArchitectureRecord, Checkpoint, DatasetRecord, Event, IdempotencyRecord, Job, make_engine,
                      make_sessionmaker, utcnow)

TERMINAL = ("succeeded", "failed", "cancelled")
CLAIMABLE = ("queued", "requeued")
UNDISPATCHED = "broker_unavailable"  # error code of a queued job whose message is not in the broker yet


class IdempotencyConflict(Exception):
    """Another request with the same Idempotency-Key won the race."""


class JobStore:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        self.sessions: sessionmaker = make_sessionmaker(self.engine)

    # ------------------------------------------------------------------ jobs
    def create_job(self, spec: dict, resolved_spec: dict, total_steps: int, owner: str = "local",
                   idempotency: tuple[str, str] | None = None) -> Job:
        """`idempotency` = (key, body hash): stored in the same transaction as the job, so two racing
        requests with one key create one job (the loser gets IdempotencyConflict and replays)."""
        try:
            with self.sessions.begin() as s:
                job = Job(spec=spec, resolved_spec=resolved_spec, total_steps=total_steps, owner=owner)
                s.add(job)
                s.flush()
                s.add(Event(job_id=job.id, type="status", message="queued", data={"status": "queued"}))
                if idempotency is not None:
                    s.add(IdempotencyRecord(owner=owner, key=idempotency[0], body_sha256=idempotency[1],
                                            job_id=job.id))
        except IntegrityError:
            if idempotency is None:
                raise
            raise IdempotencyConflict() from None
        return job

    def idempotent_job(self, owner: str, key: str) -> IdempotencyRecord | None:
        with self.sessions() as s:
            return s.get(IdempotencyRecord, (owner, key))

    def count_active(self, owner: str) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(Job).where(
                Job.owner == owner, Job.status.in_(("queued", "running", "requeued", "cancelling")))) or 0

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        with self.sessions() as s:
            query = select(Job).where(Job.id == job_id)
            if owner is not None:
                query = query.where(Job.owner == owner)
            return s.scalars(query).first()

    _VIEW = select(Job.__table__).where(Job.id == bindparam("job_id"))

    def get_job_view(self, job_id: str, owner: str | None = None) -> SimpleNamespace | None:
        """A read-only snapshot of the row with a precompiled Core query: 3× cheaper than the ORM,
        for the status poll every client makes."""
        with self.engine.connect() as connection:
            row = connection.execute(self._VIEW, {"job_id": job_id}).mappings().first()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return SimpleNamespace(**row)

    def list_jobs(self, limit: int = 20, after: str | None = None, status: str | None = None,
                  owner: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with self.sessions() as s:
            query = select(Job).order_by(Job.seq.desc())
            if owner is not None:
                query = query.where(Job.owner == owner)
            if status:
                query = query.where(Job.status == status)
            if after:
                anchor = s.scalars(select(Job.seq).where(Job.id == after)).first()
                if anchor is None:
                    raise KeyError(after)
                query = query.where(Job.seq < anchor)
            rows = list(s.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def claim(self, job_id: str, max_attempts: int, lease_seconds: float = 120, worker: str | None = None
              ) -> tuple[Job | None, str]:
        """Take the job for this process. Returns (job, token) or (None, why-not).

        A job is claimable when queued/requeued, or when its holder stopped heart-beating for
        `lease_seconds` (a killed worker). The compare-and-set on (status, attempt, lease_token)
        means two deliveries of one message can never both win.
        """
        token = uuid.uuid4().hex
        now = utcnow()
        with self.sessions.begin() as s:
            job = s.scalars(select(Job).where(Job.id == job_id)).first()
            if job is None:
                return None, "unknown job"
            if job.status in TERMINAL:
                return None, f"already {job.status}"
            held = job.status in ("running", "cancelling")
            if held and not _stale(job.heartbeat_at, now, lease_seconds):
                return None, f"already {job.status} elsewhere"
            if job.cancel_requested:
                self._set_status(s, job, "cancelled", "cancelled before it (re)started")
                job.lease_token = None
                return None, "cancelled"
            if job.attempt >= max_attempts:
                job.error_code, job.error_message = "too_many_attempts", f"gave up after {job.attempt} attempts"
                self._set_status(s, job, "failed", job.error_message)
                job.lease_token = None
                return None, "too many attempts"
            attempt = job.attempt + 1  # read before the UPDATE, which also refreshes `job` in this session
            result = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == job.status, Job.attempt == job.attempt,
                       Job.lease_token.is_(None) if job.lease_token is None else Job.lease_token == job.lease_token)
                .values(status="running", lease_token=token, heartbeat_at=now, attempt=attempt,
                        started_at=job.started_at or now, worker=worker,
                        error_code=None, error_message=None)  # a live job's only error: broker_unavailable
            )
            if result.rowcount != 1:
                return None, "claimed by another worker"
            note = " after a lost worker" if held else ""
            s.add(Event(job_id=job_id, type="status", message=f"running (attempt {attempt}){note}",
                        data={"status": "running", "attempt": attempt}))
        return self.get_job(job_id), token

    def heartbeat(self, job_id: str, token: str, step: int | None, metrics: dict | None = None) -> dict:
        """Renew the lease and record progress (`step` None: not started yet, keep the stored one).
        Returns {"lease": still ours, "cancel": cancellation requested, "preempt": …}."""
        values: dict = {"heartbeat_at": utcnow()}
        if step is not None:
            values["step"] = step
        if metrics is not None:
            values["metrics"] = metrics
        with self.sessions.begin() as s:
            result = s.execute(update(Job).where(Job.id == job_id, Job.lease_token == token).values(**values))
            flags = s.execute(select(Job.cancel_requested, Job.preempt_requested).where(Job.id == job_id)).first()
        return {"lease": result.rowcount == 1, "cancel": bool(flags and flags[0]), "preempt": bool(flags and flags[1])}

    def request_preempt(self, job_ids: list[str]) -> None:
        """A worker is shutting down: its running jobs should checkpoint and go back to the queue."""
        if job_ids:
            with self.sessions.begin() as s:
                s.execute(update(Job).where(Job.id.in_(job_ids), Job.status == "running")
                          .values(preempt_requested=True))

    def finish(self, job_id: str, token: str | None, status: str, message: str = "", result: dict | None = None,
               error_code: str | None = None) -> bool:
        with self.sessions.begin() as s:
            query = select(Job).where(Job.id == job_id)
            job = s.scalars(query.with_for_update()).first()
            if job is None or (token is not None and job.lease_token != token):
                return False
            job.result = result if result is not None else job.result
            if error_code:
                job.error_code, job.error_message = error_code, message
            self._set_status(s, job, status, message)
            job.lease_token = None
        return True

    def requeue(self, job_id: str, token: str | None, message: str) -> bool:
        """Give the job back (worker shutting down, or a stale lease found by the reaper)."""
        with self.sessions.begin() as s:
            query = update(Job).where(Job.id == job_id, Job.status.in_(("running", "cancelling")))
            if token is not None:
                query = query.where(Job.lease_token == token)
            result = s.execute(query.values(status="requeued", lease_token=None, preempt_requested=False))
            if result.rowcount == 1:
                s.add(Event(job_id=job_id, type="status", message=message, data={"status": "requeued"}))
        return result.rowcount == 1

    def stale_jobs(self, lease_seconds: float) -> list[str]:
        cutoff = utcnow() - dt.timedelta(seconds=lease_seconds)
        with self.sessions() as s:
            return list(s.scalars(select(Job.id).where(Job.status.in_(("running", "cancelling")),
                                                       or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))))

    def requeue_stale(self, lease_seconds: float) -> list[str]:
        """The reaper's half: jobs whose worker died are marked `requeued` (their message may be lost)."""
        requeued = []
        for job_id in self.stale_jobs(lease_seconds):
            with self.sessions.begin() as s:
                job = s.scalars(select(Job).where(Job.id == job_id)).first()
                if job is None or job.status not in ("running", "cancelling") or not _stale(
                        job.heartbeat_at, utcnow(), lease_seconds):
                    continue
                result = s.execute(update(Job).where(Job.id == job_id, Job.lease_token == job.lease_token,
                                                     Job.status == job.status)
                                   .values(status="requeued", lease_token=None))
                if result.rowcount == 1:
                    s.add(Event(job_id=job_id, type="status", level="warn",
                                message=f"worker lost at step {job.step}; requeued", data={"status": "requeued"}))
                    requeued.append(job_id)
        return requeued

    # ------------------------------------------------------------------ dispatch
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

    def request_cancel(self, job_id: str, owner: str | None = None) -> Job | None:
        with self.sessions.begin() as s:
            query = select(Job).where(Job.id == job_id)
            if owner is not None:
                query = query.where(Job.owner == owner)
            job = s.scalars(query.with_for_update()).first()
            if job is None:
                return None
            if job.status in TERMINAL:
                return job
            job.cancel_requested = True
            if job.status in CLAIMABLE:
                self._set_status(s, job, "cancelled", "cancelled before it started")
            else:
                self._set_status(s, job, "cancelling", "cancellation requested")
        return self.get_job(job_id)

    @staticmethod
    def _set_status(session, job: Job, status: str, message: str) -> None:
        job.status = status
        if status in TERMINAL:
            job.finished_at = utcnow()
        session.add(Event(job_id=job.id, type="status", message=message or status, data={"status": status},
                          level="error" if status == "failed" else "info"))

    # ------------------------------------------------------------------ events
    def add_events(self, job_id: str, events: Iterable[dict]) -> None:
        rows = [{"job_id": job_id, "type": e["type"], "message": e.get("message", ""), "data": e.get("data"),
                 "level": e.get("level", "info"), "created_at": utcnow()} for e in events]
        if rows:
            with self.engine.begin() as connection:  # one executemany, not an ORM object per event
                connection.execute(insert(Event), rows)

    def list_events(self, job_id: str, after: int = 0, limit: int = 100, types: tuple[str, ...] | None = None
                    ) -> list[Event]:
        with self.sessions() as s:
            query = select(Event).where(Event.job_id == job_id, Event.id > after)
            if types:
                query = query.where(Event.type.in_(types))
            return list(s.scalars(query.order_by(Event.id).limit(limit)))

    # ------------------------------------------------------------------ checkpoints
    def add_checkpoint(self, job_id: str, kind: str, step: int, filename: str, sha256: str, size: int,
                       metrics: dict | None = None) -> Checkpoint:
        with self.sessions.begin() as s:
            if kind == "resume":  # one resume checkpoint per job: the newest replaces the row
                for old in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                              Checkpoint.kind == "resume")):
                    s.delete(old)
            row = Checkpoint(job_id=job_id, kind=kind, step=step, filename=filename, sha256=sha256, size=size,
                             metrics=metrics)
            s.add(row)
            s.add(Event(job_id=job_id, type="checkpoint", message=f"{kind} checkpoint at step {step}",
                        data={"kind": kind, "step": step, "sha256": sha256}))
        return row

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        with self.sessions() as s:
            return list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                  .order_by(Checkpoint.created_at)))

    def latest_checkpoint(self, job_id: str, kind: str) -> Checkpoint | None:
        with self.sessions() as s:
            return s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == kind)
                             .order_by(Checkpoint.step.desc())).first()

    # ------------------------------------------------------------------ uploads
    def add_architecture(self, name: str, spec: dict, params: int, owner: str = "local") -> ArchitectureRecord:
        with self.sessions.begin() as s:
            row = ArchitectureRecord(name=name, spec=spec, params=params, owner=owner)
            s.add(row)
        return row

    def get_architecture(self, arch_id: str, owner: str | None = None) -> ArchitectureRecord | None:
        return self._get_owned(ArchitectureRecord, arch_id, owner)

    def list_architectures(self, owner: str | None = None) -> list[ArchitectureRecord]:
        return self._list_owned(ArchitectureRecord, owner)

    def add_dataset(self, **fields) -> DatasetRecord:
        with self.sessions.begin() as s:
            row = DatasetRecord(**fields)
            s.add(row)
        return row

    def get_dataset(self, dataset_id: str, owner: str | None = None) -> DatasetRecord | None:
        return self._get_owned(DatasetRecord, dataset_id, owner)

    def list_datasets(self, owner: str | None = None) -> list[DatasetRecord]:
        return self._list_owned(DatasetRecord, owner)

    def _get_owned(self, record, record_id: str, owner: str | None):
        """One upload by id; with `owner`, someone else's is as good as missing."""
        with self.sessions() as s:
            query = select(record).where(record.id == record_id)
            if owner is not None:
                query = query.where(record.owner == owner)
            return s.scalars(query).first()

    def _list_owned(self, record, owner: str | None) -> list:
        with self.sessions() as s:
            query = select(record).order_by(record.created_at.desc())
            if owner is not None:
                query = query.where(record.owner == owner)
            return list(s.scalars(query))

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")


def _stale(heartbeat: dt.datetime | None, now: dt.datetime, lease_seconds: float) -> bool:
    if heartbeat is None:
        return True
    if heartbeat.tzinfo is None:  # SQLite hands back naive UTC
        heartbeat = heartbeat.replace(tzinfo=dt.timezone.utc)
    return (now - heartbeat).total_seconds() > lease_seconds
