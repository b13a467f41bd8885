"""Leases: a running job belongs to the worker holding its lease token, kept alive by heartbeats.

Every write a worker makes is fenced by its token (`fence`), so a worker whose lease was taken over
(reaped, reclaimed) can't write events, checkpoints or a result. A job whose heartbeat is older than
the lease (by the database's clock) is the reaper's to requeue (`requeue_stale`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import or_, select, update

from store.db import Event, Job, db_now
from store.job_state import StorePart, set_status


class LeaseLost(Exception):
    """A worker's write was refused: its lease on the job was taken over (reaped, reclaimed)."""


def fence(session, job_id: str, token: str) -> None:
    """Lease fencing: every write a worker makes first touches its job row on the condition that it
    still holds the lease (row lock on PostgreSQL, write lock on SQLite, until the commit), so a
    worker whose lease was taken over can't write events, checkpoints or a result."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.lease_token == token)
                             .values(lease_token=Job.lease_token))
    if result.rowcount != 1:
        raise LeaseLost(job_id)


def stale(heartbeat: dt.datetime | None, now: dt.datetime, lease_seconds: float) -> bool:
    if heartbeat is None:
        return True
    if heartbeat.tzinfo is None:  # SQLite hands back naive UTC
        heartbeat = heartbeat.replace(tzinfo=dt.timezone.utc)
    return (now - heartbeat).total_seconds() > lease_seconds


class Leases(StorePart):
    def holds_lease(self, job_id: str, token: str) -> bool:
        try:
            with self.sessions.begin() as s:
                fence(s, job_id, token)
        except LeaseLost:
            return False
        return True

    def heartbeat(self, job_id: str, token: str, step: int | None, metrics: dict | None = None) -> dict:
        """Renew the lease (by the database's clock) and record progress (`step` None: not started yet,
        keep the stored one). Returns {"lease": still ours, "cancel": cancellation requested, "preempt": …}."""
        values: dict = {}
        if step is not None:
            values["step"] = step
        if metrics is not None:
            values["metrics"] = metrics
        with self.sessions.begin() as s:
            values["heartbeat_at"] = db_now(s)
            result = s.execute(update(Job).where(Job.id == job_id, Job.lease_token == token).values(**values))
            flags = s.execute(select(Job.cancel_requested, Job.preempt_requested).where(Job.id == job_id)).first()
        return {"lease": result.rowcount == 1, "cancel": bool(flags and flags[0]), "preempt": bool(flags and flags[1])}

    def request_preempt(self, job_ids: list[str] | None = None, holders: list[str] | None = None) -> None:
        """A worker is shutting down: its running jobs should checkpoint and go back to the queue.
        `holders`: "host:pid" of its training processes (a message's job id need not be the job its
        process runs: messages are slots)."""
        conditions = [Job.id.in_(job_ids)] if job_ids else []
        if holders:
            conditions.append(Job.worker.in_(holders))
        if conditions:
            with self.sessions.begin() as s:
                s.execute(update(Job).where(or_(*conditions), Job.status == "running")
                          .values(preempt_requested=True))

    def finish(self, job_id: str, token: str | None, status: str, message: str = "", result: dict | None = None,
               error_code: str | None = None) -> bool:
        """End the job. With a token (a worker): only while it holds the lease, else False."""
        with self.sessions.begin() as s:
            if token is not None:
                try:
                    fence(s, job_id, token)
                except LeaseLost:
                    return False
            now = db_now(s)
            query = select(Job).where(Job.id == job_id)
            job = s.scalars(query.with_for_update()).first()
            if job is None or (token is not None and job.lease_token != token):
                return False
            job.result = result if result is not None else job.result
            if error_code:
                job.error_code, job.error_message = error_code, message
            set_status(s, job, status, message)
            job.finished_at = now
            job.lease_token = None
        return True

    def requeue(self, job_id: str, token: str | None, message: str, preempted: bool = True) -> bool:
        """Give the job back after a clean checkpoint (worker shutting down, SIGTERM): `preempted` runs
        don't count against max_attempts. With a token, only while it holds the lease."""
        with self.sessions.begin() as s:
            query = update(Job).where(Job.id == job_id, Job.status.in_(("running", "cancelling")))
            if token is not None:
                query = query.where(Job.lease_token == token)
            values = {"status": "requeued", "lease_token": None, "preempt_requested": False}
            if preempted:
                values["preemptions"] = Job.preemptions + 1
            result = s.execute(query.values(**values))
            if result.rowcount == 1:
                s.add(Event(job_id=job_id, type="status", message=message, data={"status": "requeued"}))
        return result.rowcount == 1

    def give_back(self, job_id: str, token: str, code: str, message: str) -> bool:
        """A claimed job that could not start (a gang the Ray cluster cannot place yet): back to `queued`
        as if never claimed (its attempt not counted, no lease, nothing held), with `code` and `message`
        shown on it. Only while `token` holds the lease; False otherwise."""
        with self.sessions.begin() as s:
            job = s.scalars(select(Job).where(Job.id == job_id, Job.lease_token == token,
                                              Job.status == "running").with_for_update()).first()
            if job is None:
                return False
            job.attempt = max(0, job.attempt - 1)
            job.started_at = job.started_at if job.attempt else None
            job.lease_token, job.worker, job.heartbeat_at = None, None, None
            job.error_code, job.error_message = code, message
            set_status(s, job, "queued", message)
        return True

    def stale_jobs(self, lease_seconds: float) -> list[str]:
        """Running jobs whose last heartbeat is older than `lease_seconds` by the database's clock."""
        with self.sessions() as s:
            cutoff = db_now(s) - dt.timedelta(seconds=lease_seconds)
            return list(s.scalars(select(Job.id).where(Job.status.in_(("running", "cancelling")),
                                                       or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))))

    def requeue_stale(self, lease_seconds: float) -> list[str]:
        """The reaper's half: jobs whose worker died are marked `requeued` (their message may be lost).
        That run counts as a failed attempt (no preemption recorded)."""
        requeued = []
        for job_id in self.stale_jobs(lease_seconds):
            with self.sessions.begin() as s:
                self.write_lock(s)
                job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
                if job is None or job.status not in ("running", "cancelling") or not stale(
                        job.heartbeat_at, db_now(s), lease_seconds):
                    continue
                result = s.execute(update(Job).where(Job.id == job_id, Job.lease_token == job.lease_token,
                                                     Job.status == job.status)
                                   .values(status="requeued", lease_token=None))
                if result.rowcount == 1:
                    s.add(Event(job_id=job_id, type="status", level="warn",
                                message=f"worker lost at step {job.step}; requeued", data={"status": "requeued"}))
                    requeued.append(job_id)
        return requeued
