"""What every part of the job store shares: the job statuses, the store part's handles on the database,
and the two row rules that several parts follow (status changes write their event; event ids commit in
order per job).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import false, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from store.db import Event, Job, OwnerLock, utcnow

TERMINAL = ("succeeded", "failed", "cancelled")
CLAIMABLE = ("queued", "requeued")
ACTIVE = ("queued", "running", "requeued", "cancelling")  # what the per-owner cap counts
UNDISPATCHED = "broker_unavailable"  # error code of a queued job whose message is not in the broker yet
WAITING_FOR_DEVICES = "waiting_for_devices"  # a queued job that a worker passed over: it owns too few devices
WAITING_FOR_NODES = "waiting_for_nodes"  # a queued job on several nodes whose gang the Ray cluster could not place


class StorePart:
    """One concern of the job store (claims, leases, events, …) on the store's engine and sessions."""

    def __init__(self, engine: Engine, sessions: sessionmaker):
        self.engine, self.sessions = engine, sessions

    def write_lock(self, session) -> None:
        write_lock(session)


def write_lock(session) -> None:
    """SQLite: take the database's write lock now (a deferred transaction takes it at its first
    write), so reading candidates and claiming one is atomic there. PostgreSQL locks rows instead."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Job).where(false()).values(attempt=Job.attempt))


def lock_owners(session, owners: Iterable[str]) -> None:
    """Write each owner's lock row (sorted, so two transactions never wait on each other in a cycle):
    a row lock held to the end of the transaction on PostgreSQL, the database write lock on SQLite.
    Taken first by every transaction that must see an owner's rows exactly (caps, quotas, deletions)."""
    upsert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    for name in sorted(set(owners)):
        statement = upsert(OwnerLock).values(owner=name, touched_at=utcnow())
        session.execute(statement.on_conflict_do_update(index_elements=[OwnerLock.owner],
                                                        set_={"touched_at": statement.excluded.touched_at}))


def set_status(session, job: Job, status: str, message: str) -> None:
    """Move `job` (locked in `session`) to `status`, with its status event."""
    job.status = status
    if status in TERMINAL:
        job.finished_at = utcnow()
    lock_job_events(session, job.id)
    session.add(Event(job_id=job.id, type="status", message=message or status, data={"status": status},
                      level="error" if status == "failed" else "info"))


def lock_job_events(connection, job_id: str) -> None:
    """Call in a transaction before inserting events of `job_id` (a Session or a Connection).

    Event ids come from one sequence, but on PostgreSQL a transaction that took id 10 may commit
    after one that took id 11, and a stream that already read 11 (cursor `id > 11`) would never
    see 10. Holding the job row (FOR NO KEY UPDATE, which the job's UPDATEs take anyway) from
    before the insert to the commit makes one job's event ids commit in id order, so the
    per-job cursor is commit-safe. SQLite serialises writers already: nothing to do.

    Transactions that UPDATE the job row before inserting its event (claim's take, requeue,
    requeue_stale, finish's fence) hold this lock already; the rest (add_events, add_checkpoint,
    set_status, request_cancel) call this first. create_job's first event needs none: nobody else
    can see the job before that transaction commits.
    """
    dialect = connection.dialect if hasattr(connection, "dialect") else connection.get_bind().dialect
    if dialect.name == "postgresql":
        connection.execute(select(Job.id).where(Job.id == job_id).with_for_update(key_share=True))
