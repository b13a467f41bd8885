"""The API as a real uvicorn process on PostgreSQL stays responsive: a locked table or hundreds of open
event streams must not stall `/healthz` or the other requests; streams are capped per owner, keep
idle connections alive and close after an idle limit."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

import httpx
import pytest

from helpers.api_process import api_process
from helpers.service import (JOB, PG_ADMIN, REDIS, cleanup_redis_queue, postgres_available, redis_available,
                             temporary_postgres_database, wait_for)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                       reason="needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379"),
]


@pytest.fixture()
def server(tmp_path, request):
    """(url, database url): a fresh database and queue; nothing consumes the queue (jobs stay queued)."""
    settings = getattr(request, "param", {})
    queue = f"rigl-test-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        try:
            with api_process(tmp_path, database_url, REDIS, queue, tmp_path / "api.log", **settings) as url:
                yield url, database_url
        finally:
            cleanup_redis_queue(queue)


def _submit(url: str) -> str:
    response = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _psycopg_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


def test_healthz_answers_while_the_jobs_table_is_locked(server):
    """`LOCK TABLE jobs` in another session: job reads wait (45 of them, more than the threadpool's
    threads), and every `/healthz` still answers while the lock is held — it never touches the database or
    the threadpool. How fast it answers is bench/api_under_load.py's figure (p99 < 50 ms), not a test's."""
    import psycopg

    url, database_url = server
    job_id = _submit(url)
    answers: list[int] = []

    def reads_waiting_on_the_lock(session) -> int:
        return session.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock'").fetchone()[0]

    with psycopg.connect(_psycopg_url(database_url)) as locker, \
            psycopg.connect(_psycopg_url(database_url), autocommit=True) as watcher:
        locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        readers = [threading.Thread(target=lambda: answers.append(
            httpx.get(f"{url}/v1/jobs/{job_id}", timeout=300).status_code)) for _ in range(45)]
        for reader in readers:
            reader.start()
        wait_for(lambda: reads_waiting_on_the_lock(watcher), timeout=300, what="job reads waiting on the lock")
        # A /healthz that touched the database would wait for the lock, which is held until after the loop:
        # the generous timeout only turns such a hang into a failure.
        with httpx.Client(base_url=url, timeout=120) as client:
            healthz = [client.get("/healthz") for _ in range(100)]
        assert [(r.status_code, r.json()) for r in healthz] == [(200, {"status": "ok"})] * 100
        assert answers == []  # the reads really were waiting on the lock all along
        locker.rollback()
    for reader in readers:
        reader.join()
    assert answers == [200] * 45
    print("\nreliability: table lock: /healthz answered 100 of 100 requests while `LOCK TABLE jobs` was held "
          "and 45 job reads waited on it")


def _transactions(database_url: str) -> int:
    import psycopg

    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        return conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                            (name,)).fetchone()[0]


async def _open_streams(url: str, job_id: str, count: int, seconds: float) -> list[int]:
    """Hold `count` SSE streams of one job open for `seconds`; returns their status codes."""
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=count + 10)) as client:
        async def one():
            async with client.stream("GET", f"/v1/jobs/{job_id}/events/stream") as response:
                if response.status_code == 200:
                    async def drain():
                        async for _ in response.aiter_bytes():
                            pass
                    try:
                        await asyncio.wait_for(drain(), timeout=seconds)
                    except TimeoutError:
                        pass
                return response.status_code

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("server", [{"RIGL_MAX_STREAMS_PER_OWNER": "1000", "RIGL_STREAM_POLL_SECONDS": "0.5",
                                     "RIGL_REAPER_INTERVAL_SECONDS": "3600"}], indirect=True)
def test_open_streams_of_a_job_share_one_database_poller(server):
    """100 streams of one job for 6 s: one poller's queries (a few per second), not 100 streams' (each
    used to read the job and its events twice a second: ~5,000 transactions here, measured; now ~450,
    nearly all of them each stream's start: its job look-up and its catch-up read of the events)."""
    url, database_url = server
    before = _transactions(database_url)  # the count includes the submission and late-reported start-up
    job_id = _submit(url)
    codes = asyncio.run(_open_streams(url, job_id, 100, 6.0))
    assert codes == [200] * 100
    time.sleep(11)  # PostgreSQL's idle backends report their statistics within 10 s
    spent = _transactions(database_url) - before
    assert spent < 1000, f"{spent} database transactions for 100 streams over 6 s"


@pytest.mark.parametrize("server", [{"RIGL_MAX_STREAMS_PER_OWNER": "2", "RIGL_STREAM_KEEPALIVE_SECONDS": "0.5",
                                     "RIGL_STREAM_IDLE_SECONDS": "3"}], indirect=True)
def test_streams_are_capped_per_owner_keep_alive_and_close_when_idle(server):
    url, _ = server
    job_id = _submit(url)  # stays queued: no worker
    path = f"{url}/v1/jobs/{job_id}/events/stream"
    with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second, \
            first.stream("GET", path) as one, second.stream("GET", path) as two:
        assert one.status_code == two.status_code == 200
        with httpx.stream("GET", path, timeout=30) as refused:  # a stream: if it were accepted, it would not end
            assert refused.status_code == 429
            refused.read()
        assert refused.json()["error"]["code"] == "too_many_streams" and refused.headers["retry-after"]
        lines, ended = [], True
        for line in one.iter_lines():  # ends by itself at the idle limit (3 s of the server's clock)
            lines.append(line)
            if len(lines) > 200:  # far more than 3 s of 0.5 s keep-alives: the idle limit never came
                ended = False
                break
    keepalives = lines.count(": keep-alive")
    # One every 0.5 s of idle until the 3 s limit: at most 5, however loaded the machine (its sleeps only
    # overshoot, making fewer); at least one, so idle connections are kept alive.
    assert ended and 1 <= keepalives <= 5, lines
    assert any(line.startswith("id: ") for line in lines)  # the queued event came first

    def both_slots_free() -> bool:  # one stream ended by itself, the other was dropped by its client
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b, \
                a.stream("GET", path) as first_again, b.stream("GET", path) as second_again:
            return first_again.status_code == second_again.status_code == 200

    wait_for(both_slots_free, 10, interval=0.5, what="the streams' slots to be given back")
