"""The schema check on start, one rule for the API and the worker (store/startup.py): with
RIGL_DB_AUTO_UPGRADE=0 a worker refuses a schema behind as `rigl serve` does (it used to start and take
jobs), and a replica that ran no DDL says "no upgrade needed" (it used to log "upgraded 0006 -> 0006")."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine

from helpers.service import ROOT
from store.migrations import HEAD, downgrade, schema_state
from store.settings import Settings


def behind_database(tmp_path) -> str:
    """A database one revision behind this release's head."""
    from store.jobs import JobStore

    url = f"sqlite:///{tmp_path / 'behind.db'}"
    store = JobStore(url)
    downgrade(store.engine, "-1")
    assert not schema_state(store.engine).at_head
    store.engine.dispose()
    return url


def revision(url: str) -> str:
    return schema_state(create_engine(url)).current


def test_the_start_check_refuses_a_schema_behind_and_says_when_none_was_needed(tmp_path, monkeypatch, capsys, caplog):
    from store.startup import schema_refuses_start

    url = behind_database(tmp_path)
    behind = revision(url)
    settings = Settings(data_dir=tmp_path, database_url=url, db_auto_upgrade=False)
    assert schema_refuses_start(settings, "rigl worker")
    assert "rigl worker: the database schema is" in capsys.readouterr().err
    assert revision(url) == behind  # untouched
    caplog.set_level(logging.INFO)
    assert not schema_refuses_start(settings.model_copy(update={"db_auto_upgrade": True}), "rigl worker")
    assert revision(url) == HEAD
    caplog.clear()
    assert not schema_refuses_start(settings, "rigl worker")  # at head: starts, and says so
    assert f"database schema at {HEAD}, no upgrade needed" in caplog.text


def test_a_replica_that_finds_the_upgrade_done_under_the_lock_logs_no_upgrade(tmp_path, monkeypatch, caplog):
    """Two replicas start on a schema behind; one upgrades while the other waits on the lock. The other
    then runs no DDL: its line says so instead of 'upgraded X -> X'."""
    import store.migrations as migrations

    url = behind_database(tmp_path)
    engine = create_engine(url)
    seen = schema_state(engine)  # what the second replica read before the first one's upgrade
    migrations.upgrade(engine)  # the first replica
    reads = iter([seen])
    real = migrations.schema_state
    monkeypatch.setattr(migrations, "schema_state", lambda e: next(reads, None) or real(e))
    caplog.set_level(logging.INFO, logger="store.migrations")
    migrations.ensure_schema(engine)
    assert f"database schema at {HEAD}, no upgrade needed" in caplog.text
    assert " -> " not in caplog.text, caplog.text


@pytest.mark.slow
def test_a_worker_refuses_to_start_on_a_schema_behind_with_auto_upgrade_off(tmp_path):
    url = behind_database(tmp_path)
    behind = revision(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    env.update({"RIGL_DATABASE_URL": url, "RIGL_DATA_DIR": str(tmp_path / "data"), "RIGL_DB_AUTO_UPGRADE": "0",
                "RIGL_LOG_FORMAT": "json"})
    try:
        worker = subprocess.run([sys.executable, "-m", "rigl_core.cli", "worker"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as started:  # the old behaviour: it started and waited for jobs
        pytest.fail(f"the worker started on a schema behind: {started.stderr}")
    assert worker.returncode == 2, worker.stderr
    assert "rigl worker: the database schema is" in worker.stderr and "rigl db upgrade" in worker.stderr
    assert revision(url) == behind
