"""Many jobs on one PostgreSQL: the hot reads walk an index instead of reading every matching row.

Why: bench/scale.py found claims at 3.9 s p99 with 100,000 jobs (the fairness query read every job of every
waiting owner), and an owner's page or a job's event page could walk the whole table. These tests seed
20,000 finished jobs and their events in a real database (one owner and one status rare and old: a
walk back from the newest job would read nearly all of them), then re-run the statements the store really
runs (captured as they execute) under EXPLAIN ANALYZE and count the rows each read. Also: the pool-size
settings' errors.
"""

from __future__ import annotations

import pytest
from sqlalchemy import event

from helpers.service import postgres_available, temporary_postgres_database

needs_pg = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")


@pytest.fixture(scope="module")
def store():
    from store.jobs import JobStore

    with temporary_postgres_database() as url:
        store = JobStore(url)
        with store.engine.begin() as c:
            c.exec_driver_sql("""
                INSERT INTO jobs (id, owner, status, spec, resolved_spec, created_at, started_at, step, total_steps,
                                  devices, attempt, preemptions, cancel_requested, preempt_requested)
                SELECT 'job_' || lpad(to_hex(g), 20, '0'),
                       CASE WHEN g <= 300 THEN 'rare' ELSE 'owner' || mod(g, 5) END,
                       CASE WHEN g <= 300 AND mod(g, 2) = 0 THEN 'failed' ELSE 'succeeded' END,
                       '{}'::json, '{}'::json,
                       now(), now() - make_interval(secs => g), 10, 10, 1, 1, 0, false, false
                FROM generate_series(1, 20000) g""")
            c.exec_driver_sql("""
                INSERT INTO events (job_id, created_at, type, level, message, data)
                SELECT j.id, now(), 'metrics', 'info', '', '{}'::json FROM jobs j, generate_series(1, 10) k""")
            c.exec_driver_sql("""
                INSERT INTO jobs (id, owner, status, spec, resolved_spec, created_at, step, total_steps, devices,
                                  attempt, preemptions, cancel_requested, preempt_requested)
                VALUES ('job_' || repeat('0', 20), 'owner1', 'running', '{}', '{}', now(), 0, 10, 1, 1, 0, false, false)""")
            c.exec_driver_sql("""
                INSERT INTO events (job_id, created_at, type, level, message, data)
                SELECT 'job_' || repeat('0', 20), now(), 'metrics', 'info', '', '{}'::json FROM generate_series(1, 5000)""")
            c.exec_driver_sql("UPDATE jobs SET status = 'queued' WHERE seq > 19990 AND seq <= 20000")
            c.exec_driver_sql("ANALYZE")
        yield store
        store.engine.dispose()


def rows_read(plan: dict) -> int:
    """Rows the plan's scans produced or threw away (EXPLAIN ANALYZE), over the whole tree."""
    own = 0
    if "Scan" in plan["Node Type"]:
        own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) + plan.get("Rows Removed by Filter", 0)
    return own + sum(rows_read(child) for child in plan.get("Plans", []))


def reads(store, call) -> list[tuple[int, str]]:
    """(rows read, statement) of every SELECT `call` runs through the store's engine, re-run under
    EXPLAIN ANALYZE (in a transaction that is rolled back)."""
    captured = []

    def grab(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("SELECT") and "clock_timestamp" not in statement:
            captured.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", grab)
    try:
        call()
    finally:
        event.remove(store.engine, "before_cursor_execute", grab)
    out = []
    with store.engine.connect() as c:
        for statement, parameters in captured:
            plan = c.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters).scalar()
            out.append((rows_read(plan[0]["Plan"]), statement))
        c.rollback()
    return out


@pytest.mark.slow
@needs_pg
def test_an_owners_job_list_reads_one_page(store):
    read = reads(store, lambda: store.list_jobs(20, owner="rare"))
    assert max(n for n, _ in read) <= 100, read


@needs_pg
def test_a_status_filter_reads_one_page(store):
    read = reads(store, lambda: store.list_jobs(50, status="failed"))
    assert max(n for n, _ in read) <= 200, read


@needs_pg
def test_an_event_cursor_reads_one_page(store):
    """The job's own 5,000 events at most (index, then sorted), never the table's 205,000: the primary key walk
    from the cursor read every event written after the job's first one."""
    read = reads(store, lambda: (store.events.list_events("job_" + "0" * 20, 5, 100), store.events.last_event_id("job_" + "0" * 20)))
    assert max(n for n, _ in read) <= 2 * 5000 + 100, read


@needs_pg
def test_the_fair_claim_reads_no_owners_whole_history(store):
    queued = store.list_jobs(1, status="queued")[0][0].id
    read = reads(store, lambda: store.claims.claim(queued, max_attempts=3, lease_seconds=60, worker="test"))
    assert read and max(n for n, _ in read) <= 1000, read


def test_pool_sizes_come_from_the_environment_and_name_a_bad_one(monkeypatch):
    from store.settings import database_settings

    def pool_sizes():
        settings = database_settings()
        return settings.db_pool_size, settings.db_max_overflow

    monkeypatch.delenv("RIGL_DB_POOL_SIZE", raising=False)
    monkeypatch.delenv("RIGL_DB_MAX_OVERFLOW", raising=False)
    assert pool_sizes() == (10, 20)
    monkeypatch.setenv("RIGL_DB_POOL_SIZE", "4")
    monkeypatch.setenv("RIGL_DB_MAX_OVERFLOW", "0")
    assert pool_sizes() == (4, 0)
    monkeypatch.setenv("RIGL_DB_POOL_SIZE", "0")
    with pytest.raises(ValueError, match="RIGL_DB_POOL_SIZE"):
        pool_sizes()
