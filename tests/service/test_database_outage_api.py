"""The API while PostgreSQL refuses connections: a JSON 503 with Retry-After (retryable, nothing changed),
never a 500, and back to normal once the database accepts connections again. Real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient

from helpers.service import JOB, PG_ADMIN, postgres_available, temporary_postgres_database
from store.settings import Settings

pytestmark = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")


def _allow_connections(name: str, allow: bool) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allow else "false"}')
        if not allow:  # and drop the API's pooled connections, as a restart of the server would
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def test_a_refused_database_is_a_503_and_the_api_recovers(tmp_path):
    from api.app import create_app

    with temporary_postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        settings = Settings(data_dir=tmp_path, database_url=url, auth=False).resolved()
        with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:
            job = api.post("/v1/jobs", json=JOB)
            assert job.status_code == 201, job.text
            _allow_connections(name, False)
            try:
                for method, path, body in (("GET", "/v1/jobs", None), ("GET", f"/v1/jobs/{job.json()['id']}", None),
                                           ("POST", "/v1/jobs", JOB)):
                    response = api.request(method, path, json=body)
                    assert response.status_code == 503, (path, response.text)
                    assert response.json()["error"]["code"] == "database_unavailable"
                    assert response.headers["retry-after"] == "5"
                assert api.get("/readyz").status_code == 503
            finally:
                _allow_connections(name, True)
            assert api.get("/v1/jobs").status_code == 200
            assert [j["id"] for j in api.get("/v1/jobs").json()["data"]] == [job.json()["id"]]  # none added


def test_a_schema_bug_is_not_dressed_up_as_an_outage():
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from api.errors import database_unavailable

    locked = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    missing = OperationalError("SELECT x", {}, sqlite3.OperationalError("no such column: jobs.x"))
    assert database_unavailable(locked) and not database_unavailable(missing)
