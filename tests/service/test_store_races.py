"""Races in the job store, forced deterministically on real databases.

- A cancel racing a finish must never overwrite `succeeded` (SQLite: a read outside the write
  transaction used to decide the write).
- One job's event ids must commit in id order (PostgreSQL: a transaction holding id N may commit
  after the one holding N+1, and a stream whose cursor passed N+1 would never see N).
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event as sa_event

from helpers.service import JOB, postgres_available, temporary_postgres_database
from store.jobs import JobStore


def _running_job(store: JobStore) -> tuple[str, str]:
    job = store.create_job(JOB, JOB, 46)
    claimed, token = store.claims.claim(job.id, max_attempts=3, worker="host:1")
    assert claimed is not None
    return job.id, token


def test_a_cancel_racing_a_finish_never_overwrites_succeeded_on_sqlite(tmp_path):
    """The worker's `succeeded` commits between the cancel's look at the job and its write."""
    store = JobStore(f"sqlite:///{tmp_path / 'race.db'}")
    job_id, token = _running_job(store)
    cancelling = threading.local()
    fired = []

    def finish_first(_conn, _cursor, statement, *_args):
        first_write = statement.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))
        if getattr(cancelling, "on", False) and not fired and first_write:  # before its write transaction opens
            fired.append(True)  # the worker finishes now, from its own thread and connection
            worker = threading.Thread(target=store.leases.finish, args=(job_id, token, "succeeded", "done"))
            worker.start()
            worker.join(timeout=30)

    sa_event.listen(store.engine, "before_cursor_execute", finish_first)
    try:
        cancelling.on = True
        store.request_cancel(job_id)
        cancelling.on = False
    finally:
        sa_event.remove(store.engine, "before_cursor_execute", finish_first)
    assert fired, "the cancel never wrote to the job"
    job = store.get_job(job_id)
    assert job.status == "succeeded", job.status
    statuses = [e.data["status"] for e in store.events.list_events(job_id, 0, 100) if e.type == "status"]
    assert statuses == ["queued", "running", "succeeded"], statuses


def test_cancel_still_cancels_queued_and_running_jobs(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'cancel.db'}")
    queued = store.create_job(JOB, JOB, 46)
    assert store.request_cancel(queued.id).status == "cancelled"
    running, _ = _running_job(store)
    assert store.request_cancel(running).status == "cancelling"
    assert store.request_cancel(running).status == "cancelling"  # twice: one event, not two
    statuses = [e.data["status"] for e in store.events.list_events(running, 0, 100) if e.type == "status"]
    assert statuses == ["queued", "running", "cancelling"]
    assert store.request_cancel(queued.id, owner="someone-else") is None


@pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")
def test_one_jobs_event_ids_commit_in_id_order_on_postgresql():
    """A slow writer (its insert is held 1.5 s before commit by a trigger) and a fast one that starts
    later: every snapshot a reader takes must be a prefix of the final list, or a stream skips events."""
    with temporary_postgres_database() as url:
        store = JobStore(url)
        job_id, token = _running_job(store)
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE FUNCTION slow_insert() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$ "
                "LANGUAGE plpgsql")
            connection.exec_driver_sql("CREATE TRIGGER slow AFTER INSERT ON events FOR EACH ROW "
                                       "WHEN (NEW.message = 'slow') EXECUTE FUNCTION slow_insert()")
        writers = [
            threading.Thread(target=store.events.add_events, args=(job_id, [{"type": "message", "message": "slow"}])),
            threading.Thread(target=store.events.add_events, args=(job_id, [{"type": "message", "message": "fast"}])),
            threading.Thread(target=store.checkpoints.add_checkpoint, args=(job_id, "resume", 5, "resume.pt", "0" * 64, 1)),
            threading.Thread(target=store.leases.finish, args=(job_id, token, "succeeded", "done")),
        ]
        snapshots = []
        writers[0].start()
        time.sleep(0.3)  # the slow writer has its id and sits in the trigger
        for writer in writers[1:]:
            writer.start()
        deadline = time.monotonic() + 10
        while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
            snapshots.append([e.id for e in store.events.list_events(job_id, 0, 1000)])
            time.sleep(0.05)
        for writer in writers:
            writer.join(timeout=30)
        final = [e.id for e in store.events.list_events(job_id, 0, 1000)]
        messages = [e.message for e in store.events.list_events(job_id, 0, 1000)]
        assert {"slow", "fast", "resume checkpoint at step 5", "done"} <= set(messages), messages
        assert final == sorted(final)
        skipped = [s for s in snapshots if s != final[:len(s)]]
        assert not skipped, f"a reader saw {skipped[0]} before the final {final}: a cursor would skip events"
        store.engine.dispose()
