"""Schema migrations: the models and the migrations never drift, a first-release database upgrades and its
jobs read back through the API, replicas starting together migrate once, a failed upgrade changes nothing.

Real SQLite files and real PostgreSQL databases (created here and dropped); nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text

from helpers import first_release_models as first
from helpers.service import JOB, ROOT, postgres_available, serve_process, temporary_postgres_database
from store.migrations import HEAD, SchemaBehind, downgrade, schema_diff, schema_state, upgrade
from store.settings import Settings

needs_pg = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")
OLD_JOBS = [("rigl", "succeeded"), ("set", "failed"), ("static", "queued")]  # oldest first


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'rigl.db'}"
    else:
        with temporary_postgres_database() as url:
            yield url


def resolved(method: str) -> dict:
    from rigl_core.spec import JobSpec

    return JobSpec.model_validate({**JOB, "sparsity": {**JOB["sparsity"], "method": method}}).model_dump(mode="json")


def build_first_release(url: str, events_per_job: int = 5) -> list[str]:
    """A database as the first release made it (its own create_all), holding jobs and events. Returns job ids."""
    engine = create_engine(url)
    first.Base.metadata.create_all(engine)
    ids = []
    with first.make_sessionmaker(engine).begin() as s:
        for index, (method, status) in enumerate(OLD_JOBS):
            job = first.Job(spec={**JOB, "sparsity": {**JOB["sparsity"], "method": method}},
                            resolved_spec=resolved(method), status=status, total_steps=46, step=46 * (index != 2),
                            created_at=dt.datetime(2026, 11, 24, 12, index, tzinfo=dt.timezone.utc),
                            error_code="worker_lost" if status == "failed" else None,
                            error_message="lost" if status == "failed" else None)
            s.add(job)
            s.flush()
            s.add_all(first.Event(job_id=job.id, type="metrics", message=f"step {i}", data={"step": i})
                      for i in range(events_per_job))
            ids.append(job.id)
    engine.dispose()
    return ids


def columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_head_is_the_last_revision_of_one_linear_chain():
    from store.migrations import _script_directory

    scripts = _script_directory()
    assert scripts.get_heads() == [HEAD]
    chain = [s.revision for s in scripts.walk_revisions()]
    assert chain == ["0012", "0011", "0010", "0009", "0008", "0006", "0005", "0004", "0003", "0002", "0001"]


def test_migrations_make_exactly_the_models(database_url):
    """The autogenerate check: a database migrated from nothing matches the models (no diff), and
    revision 0001 alone matches the first release's models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(database_url)
    assert upgrade(engine, "0001") == (None, "0001")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, first.Base.metadata) == []
    assert upgrade(engine) == ("0001", HEAD)
    assert schema_diff(engine) == []
    assert schema_state(engine).at_head
    engine.dispose()


def test_first_release_database_upgrades_and_its_jobs_read_through_the_api(database_url, tmp_path):
    from api.app import create_app

    ids = build_first_release(database_url)
    assert "preempt_requested" not in columns(database_url, "jobs")  # the column the error named
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, auth=False)
    with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:  # upgrades on open
        listed = api.get("/v1/jobs").json()["data"]
        assert [j["id"] for j in listed] == ids[::-1]
        assert [(j["method"], j["status"]) for j in listed] == OLD_JOBS[::-1]  # method filled from the spec
        assert all(j["name"] is None and j["tags"] == [] and j["metadata"] == {} for j in listed)
        old = api.get(f"/v1/jobs/{ids[1]}").json()
        assert old["error"] == {"code": "worker_lost", "message": "lost"} and old["progress"]["step"] == 46
        assert old["spec"]["sparsity"]["method"] == "set"
        events = api.get(f"/v1/jobs/{ids[0]}/events").json()["data"]
        assert [e["data"]["step"] for e in events] == list(range(5))
        assert [j["id"] for j in api.get("/v1/jobs?method=set").json()["data"]] == [ids[1]]
        # the upgraded database takes new jobs, with labels
        new = api.post("/v1/jobs", json={**JOB, "name": "after upgrade", "tags": ["v2"]}).json()
        assert api.get("/v1/jobs?tag=v2").json()["data"][0]["id"] == new["id"]
    engine = create_engine(database_url)
    assert schema_state(engine).current == HEAD and schema_diff(engine) == []
    engine.dispose()


def test_databases_of_every_create_all_release_upgrade(database_url):
    """A first-release database that a later create_all release had opened (its new tables made, no new
    column: the `no such column: jobs.preempt_requested` failure), and one made by the last create_all
    release, both reach head with nothing missing."""
    from store.db import Base

    build_first_release(database_url)
    engine = create_engine(database_url)
    later = [Base.metadata.tables[name] for name in ("api_keys", "idempotency", "owner_locks", "weights")]
    Base.metadata.create_all(engine, tables=later)
    with engine.begin() as connection:  # a column revision 0008 added, after the create_all releases
        connection.execute(text("ALTER TABLE weights DROP COLUMN tensor_index"))
    assert schema_state(engine).current is None
    assert upgrade(engine) == (None, HEAD)
    assert schema_diff(engine) == []
    engine.dispose()


def test_database_of_the_last_create_all_release_upgrades(tmp_path):
    url = f"sqlite:///{tmp_path / 'last.db'}"
    engine = create_engine(url)
    upgrade(engine, "0002")  # the schema create_all made at the last release before migrations...
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))  # ...which had no version table
    assert schema_state(engine).describe().startswith("none: made before migrations")
    assert upgrade(engine) == (None, HEAD)
    assert schema_diff(engine) == []
    engine.dispose()


def _start_replica(url: str, barrier, results) -> None:
    # SQLite with a busy timeout, as store/engine.py opens it: a replica waits for the migrating one's lock
    # (SQLite's default 5 s ran out on a loaded machine: "database is locked")
    engine = create_engine(url, connect_args={"timeout": 60} if url.startswith("sqlite") else {})
    try:
        barrier.wait(30)
        results.put(upgrade(engine))
    except Exception as exc:  # noqa: BLE001 - reported by the test
        results.put(repr(exc))
    finally:
        engine.dispose()


def test_replicas_starting_together_migrate_once(database_url):
    """Four processes upgrade a first-release database at the same instant: one migrates, the others wait
    for its lock and find the schema at head; none fails on a half-made schema."""
    import multiprocessing

    build_first_release(database_url)
    context = multiprocessing.get_context("fork")  # a replica: its own process and connections
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_start_replica, args=(database_url, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
    assert sorted(outcomes, key=lambda r: str(r[0])) == [(HEAD, HEAD)] * 3 + [(None, HEAD)], outcomes


def test_a_failed_upgrade_changes_nothing(database_url):
    """Transactional DDL on both databases: 0003 fails (a job_tags table of another shape is in the way),
    and 0002's columns, added earlier in the same upgrade, are rolled back with it."""
    build_first_release(database_url)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE job_tags (something INTEGER)"))
    with pytest.raises(Exception, match="job_tags"):
        upgrade(engine)
    assert schema_state(engine).current is None
    assert "preempt_requested" not in columns(database_url, "jobs")
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE job_tags"))
    assert upgrade(engine) == (None, HEAD)
    engine.dispose()


def test_downgrade_of_job_metadata_and_back(tmp_path):
    url = f"sqlite:///{tmp_path / 'down.db'}"
    build_first_release(url)
    engine = create_engine(url)
    upgrade(engine)
    downgrade(engine, "0002")
    assert schema_state(engine).current == "0002"
    assert {"name", "tags", "meta", "method"}.isdisjoint(columns(url, "jobs"))
    assert "job_tags" not in inspect(engine).get_table_names()
    assert "tensor_index" not in columns(url, "weights")
    upgrade(engine)
    assert schema_diff(engine) == []
    engine.dispose()


def test_auto_upgrade_off_refuses_to_start_behind(tmp_path, monkeypatch):
    from store.jobs import JobStore

    url = f"sqlite:///{tmp_path / 'old.db'}"
    build_first_release(url)
    monkeypatch.setenv("RIGL_DB_AUTO_UPGRADE", "0")
    with pytest.raises(SchemaBehind, match="rigl db upgrade"):
        JobStore(url)
    assert schema_state(create_engine(url)).current is None  # untouched
    monkeypatch.delenv("RIGL_DB_AUTO_UPGRADE")
    assert JobStore(url).list_jobs()[0][0].method == "static"


def test_a_database_a_newer_release_migrated_is_used_as_it_is(tmp_path):
    from store.jobs import JobStore

    url = f"sqlite:///{tmp_path / 'new.db'}"
    store = JobStore(url)
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    assert not schema_state(store.engine).known
    JobStore(url).list_jobs()  # a rolling deploy's old replica still starts


def rigl(*args: str, env: dict) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    return subprocess.run([sys.executable, "-m", "rigl_core.cli", *args], env={**environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_rigl_db_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    build_first_release(url)
    env = {"RIGL_DATABASE_URL": url, "RIGL_DATA_DIR": str(tmp_path / "data")}
    current = rigl("db", "current", env=env)
    assert current.returncode == 0 and "made before migrations" in current.stdout
    check = rigl("db", "check", env=env)
    assert check.returncode == 1 and "run `rigl db upgrade`" in check.stdout
    upgraded = rigl("db", "upgrade", env=env)
    assert upgraded.returncode == 0 and f"none -> {HEAD}" in upgraded.stdout, upgraded.stderr
    check = rigl("db", "check", env=env)
    assert check.returncode == 0 and "matches the models" in check.stdout


@pytest.mark.slow
def test_rigl_serve_upgrades_an_embedded_database_or_refuses_when_told(tmp_path):
    import httpx

    data = tmp_path / "data"
    data.mkdir()
    ids = build_first_release(f"sqlite:///{data / 'rigl.db'}")
    refused = rigl("serve", "--no-worker", "--port", "1", env={"RIGL_DATA_DIR": str(data), "RIGL_DB_AUTO_UPGRADE": "0"})
    assert refused.returncode == 2 and "rigl db upgrade" in refused.stderr, refused.stderr
    with serve_process(data, args=("--no-worker",)) as (url, _process):
        listed = httpx.get(f"{url}/v1/jobs", timeout=10).json()["data"]
    assert [j["id"] for j in listed] == ids[::-1]


def test_sizes_and_parameter_counts_past_two_gib_fit_after_the_upgrade(database_url):
    """0004: a 7B model's weights (14 GB, 7·10^9 values) used to overflow PostgreSQL's INTEGER."""
    from store.db import WeightsRecord
    from store.engine import make_engine, make_sessionmaker

    engine = make_engine(database_url)
    upgrade(engine)
    big = WeightsRecord(owner="local", name="llm.safetensors", size=14 * 2**30, sha256="0" * 64, tensors=291,
                        params=7_000_000_000)
    with make_sessionmaker(engine).begin() as session:
        session.add(big)
    with make_sessionmaker(engine)() as session:
        stored = session.get(WeightsRecord, big.id)
        assert (stored.size, stored.params) == (14 * 2**30, 7_000_000_000)
    engine.dispose()
