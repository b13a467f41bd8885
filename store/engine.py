"""Open the database: an engine sized from the settings, its schema brought to head on start.

Apart from the models (store/db.py) so that the migrations (store/migrations), which read the models,
and the opener, which runs the migrations, import each other in one direction only.
"""

from __future__ import annotations

import logging
import time

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from store.migrations import ensure_schema
from store.settings import Settings, database_settings

log = logging.getLogger(__name__)


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    """SQLite gets WAL and a busy timeout so the API and the worker process can share it.
    `settings`: the pool sizes and RIGL_DB_AUTO_UPGRADE (None: read from the environment)."""
    settings = settings or database_settings()
    # sqlalchemy.create_engine looked up per call: with tracing on, service_common/tracing.py wraps it
    if url.startswith("sqlite"):
        engine = sqlalchemy.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    else:
        # connect_timeout: a worker whose database is unreachable fails fast and retries (worker/retry.py)
        # instead of hanging in connect()
        connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
        engine = sqlalchemy.create_engine(url, pool_pre_ping=True, pool_size=settings.db_pool_size,
                               max_overflow=settings.db_max_overflow, connect_args=connect_args)
    for attempt in range(5):  # a database that is still starting (compose) gets a few seconds
        try:
            ensure_schema(engine, auto_upgrade=settings.db_auto_upgrade)
            break
        except OperationalError:
            if attempt == 4:
                raise
            log.warning("database not reachable yet; retrying its schema check")
            time.sleep(0.5 * (attempt + 1))
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
