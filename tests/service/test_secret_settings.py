"""Settings read secrets from files (`RIGL_<NAME>_FILE`, how docker-compose.yml hands them over), put the
database and broker passwords into their URLs, and refuse a `change-me…` placeholder wherever it is."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from store.settings import Settings, database_settings

COMPOSE_ENV = {"RIGL_DATABASE_URL": "postgresql+psycopg://rigl@postgres:5432/rigl",
               "RIGL_BROKER_URL": "redis://redis:6379/0"}


@pytest.fixture
def environ(monkeypatch):
    """A clean RIGL_ environment; returns a setter."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("RIGL_"):
            monkeypatch.delenv(key)

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def test_secret_files_fill_the_passwords_into_the_urls(environ, tmp_path):
    """The compose stack's way: URLs without passwords, the passwords in files (a final newline, as
    docker/make-secrets.sh writes them, is not part of the secret)."""
    (tmp_path / "postgres_password").write_text("p0stgres/pass:word@1\n")
    (tmp_path / "redis_password").write_text("r3dis\n")
    (tmp_path / "metrics_token").write_text("t0ken\r\n")
    environ(**COMPOSE_ENV, RIGL_DATABASE_PASSWORD_FILE=str(tmp_path / "postgres_password"),
            RIGL_BROKER_PASSWORD_FILE=str(tmp_path / "redis_password"),
            RIGL_METRICS_TOKEN_FILE=str(tmp_path / "metrics_token"))
    settings = Settings()
    url = make_url(settings.database_url)
    assert (url.username, url.password, url.host, url.database) == ("rigl", "p0stgres/pass:word@1", "postgres", "rigl")
    assert settings.broker_url == "redis://:r3dis@redis:6379/0"
    assert settings.metrics_token == "t0ken"
    assert "t0ken" not in repr(settings) and "database_password" not in repr(settings)  # kept out of log lines


def test_any_setting_may_come_from_a_file(environ, tmp_path):
    (tmp_path / "queue").write_text("from-a-file\n")
    environ(RIGL_QUEUE_FILE=str(tmp_path / "queue"))
    assert Settings().queue == "from-a-file"


@pytest.mark.parametrize("problem, expected", [
    ("missing", "RIGL_BROKER_PASSWORD_FILE: cannot read"),
    ("empty", "RIGL_BROKER_PASSWORD_FILE: "),
    ("both", "RIGL_BROKER_PASSWORD and RIGL_BROKER_PASSWORD_FILE are both set"),
])
def test_a_secret_file_that_cannot_be_used_stops_the_service(environ, tmp_path, problem, expected):
    """Never a silent fallback: a service must not start without the secret it was given."""
    path = tmp_path / "redis_password"
    if problem != "missing":
        path.write_text("\n" if problem == "empty" else "r3dis\n")
    environ(**COMPOSE_ENV, RIGL_BROKER_PASSWORD_FILE=str(path))
    if problem == "both":
        environ(RIGL_BROKER_PASSWORD="other")
    with pytest.raises(ValueError, match=expected):
        database_settings()


@pytest.mark.parametrize("variables, named", [
    ({"RIGL_DATABASE_PASSWORD": "change-me-postgres"}, "RIGL_DATABASE_PASSWORD"),
    ({"RIGL_BROKER_PASSWORD": "Change-Me-redis"}, "RIGL_BROKER_PASSWORD"),
    ({"RIGL_DATABASE_URL": "postgresql+psycopg://rigl:change-me-postgres@postgres:5432/rigl"}, "RIGL_DATABASE_URL"),
    ({"RIGL_BROKER_URL": "redis://:change-me-redis@redis:6379/0"}, "RIGL_BROKER_URL"),
    ({"RIGL_METRICS_TOKEN": "changeme"}, "RIGL_METRICS_TOKEN"),
])
def test_a_placeholder_secret_is_refused(environ, variables, named):
    """The passwords .env.example used to ship start nothing: the service names the variable."""
    environ(**{**COMPOSE_ENV, **variables})
    with pytest.raises(ValueError, match=f"{named}: a `change-me…` placeholder is not a secret"):
        database_settings()


def test_a_password_needs_its_url(environ):
    environ(RIGL_BROKER_PASSWORD="r3dis")
    with pytest.raises(ValueError, match="RIGL_BROKER_PASSWORD needs RIGL_BROKER_URL"):
        database_settings()
