"""Schema versions: the alembic revisions in versions/, applied on start and by `rigl db upgrade`.

Why: the tables used to be made by create_all, which adds missing tables but never a missing column,
so a database from an earlier release opened and then failed (`no such column: jobs.preempt_requested`).

Revisions: 0001 is the first release's schema (commit 74f9590); 0002 brings any database made by a
create_all release up to the last of them, adding only what it lacks (such a database may be at any
of those releases, with the later tables and without the later columns); 0003 adds job name, tags,
metadata and method; 0004 makes sizes and parameter counts 64-bit;
0005 adds sweeps and jobs.sweep_id; 0006 adds the indexes many jobs and workers need (keyset pages,
event cursors, the fair claim); 0008 keeps uploaded weights' tensor index; 0009 stores each job's plan;
0010 adds webhooks and their deliveries; 0011 sweeps' search; 0012 adds jobs.trace_context (the
submitting request's trace, service_common/tracing.py). A database with no alembic_version table is
either empty (migrated from nothing) or, holding `jobs`, made by a create_all release: stamped 0001, then upgraded.

Concurrency: an upgrade is one transaction that first takes a lock, so replicas starting together
migrate once: PostgreSQL's pg_advisory_xact_lock (the others wait, then find the schema at head),
SQLite's write lock (BEGIN IMMEDIATE). Both have transactional DDL: a failed upgrade changes nothing.

Changing a model: add a revision (`new_revision(engine, "what")` drafts one with alembic's autogenerate
against a database at head; review it, keep it additive so older replicas keep working through a rolling
deploy), move HEAD to it; tests/test_migrations.py compares models and migrations on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

HEAD = "0012"  # the newest revision in versions/ (tests/test_migrations.py checks it)
FIRST_RELEASE = "0001"
LOCK_KEY = 0x7269676C  # PostgreSQL advisory lock id of schema upgrades ("rigl")
VERSION_TABLE = "alembic_version"

log = logging.getLogger(__name__)


class SchemaBehind(RuntimeError):
    """The database needs an upgrade and RIGL_DB_AUTO_UPGRADE=0 forbids doing it on start."""


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # None: no version table (an empty database, or one made before migrations)
    head: str
    has_tables: bool  # the `jobs` table exists
    known: bool  # `current` is a revision this code has (False: a newer release migrated it)

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    def describe(self) -> str:
        if self.at_head:
            return f"{self.current} (head)"
        if self.current is None:
            return ("none: an empty database" if not self.has_tables else
                    "none: made before migrations (an upgrade stamps it 0001, then upgrades it)") + f"; head {self.head}"
        if not self.known:
            return f"{self.current}: newer than this release (head {self.head})"
        return f"{self.current}; head {self.head}: behind"


def schema_state(engine_or_connection) -> SchemaState:
    """Read without a lock or alembic: the check every start makes must be cheap."""
    if isinstance(engine_or_connection, Engine):
        with engine_or_connection.connect() as connection:
            return schema_state(connection)
    connection = engine_or_connection
    names = set(inspect(connection).get_table_names())
    current = None
    if VERSION_TABLE in names:
        current = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    return SchemaState(current, HEAD, "jobs" in names, current is None or current in revisions())


def ensure_schema(engine: Engine, auto_upgrade: bool = True) -> SchemaState:
    """On every start (make_engine): nothing when at head; upgrade when behind (or raise SchemaBehind
    with auto_upgrade off); a database a newer release migrated is used as it is, with a warning
    (revisions only add, so this release's queries still work there: a rolling deploy's old replicas)."""
    state = schema_state(engine)
    if state.at_head:
        return state
    if not state.known:
        log.warning("database schema %s is newer than this release's %s; using it as it is", state.current, HEAD)
        return state
    if not auto_upgrade:
        raise SchemaBehind(f"the database schema is {state.describe()}; run `rigl db upgrade` against it "
                           "(RIGL_DB_AUTO_UPGRADE=0 turns off the upgrade on start)")
    before, after = upgrade(engine)
    log_upgrade(before, after, state.has_tables)
    return schema_state(engine)


def log_upgrade(before: str | None, after: str | None, had_tables: bool) -> None:
    """What an upgrade on start did. A replica that found the schema behind, then waited on the lock while
    another replica upgraded it, ran no DDL: it says so (it used to log "upgraded 0006 -> 0006")."""
    if before == after:
        log.info("database schema at %s, no upgrade needed (another process upgraded it)", after)
    elif before is None and not had_tables:
        log.info("database schema created at %s", after)
    else:
        log.warning("database schema upgraded: %s -> %s", before or "made before migrations", after)


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str | None]:
    """Upgrade under the lock (stamping a pre-migration database first). Returns (before, after)."""
    from alembic import command

    with locked_connection(engine) as connection:
        state = schema_state(connection)  # read again under the lock: another replica may have done it
        config = alembic_config(connection)
        if state.current is None and state.has_tables:
            command.stamp(config, FIRST_RELEASE)
        command.upgrade(config, target)
        after = schema_state(connection).current
    return state.current, after


def downgrade(engine: Engine, target: str) -> None:
    from alembic import command

    with locked_connection(engine) as connection:
        command.downgrade(alembic_config(connection), target)


def schema_diff(engine: Engine) -> list:
    """What alembic's autogenerate would write to make the database match the models: [] when they agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from store.db import Base

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def new_revision(engine: Engine, message: str, revision_id: str) -> None:
    """Draft versions/<revision_id>_<slug>.py from the difference between the models and `engine` (at head)."""
    from alembic import command

    with locked_connection(engine) as connection:
        command.revision(alembic_config(connection), message, autogenerate=True, rev_id=revision_id)


def revisions() -> set[str]:
    return {script.revision for script in _script_directory().walk_revisions()}


def alembic_config(connection: Connection | None = None):
    """An alembic Config without an ini file; env.py takes the connection from its attributes."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


_SCRIPTS = None


def _script_directory():
    global _SCRIPTS
    if _SCRIPTS is None:
        from alembic.script import ScriptDirectory

        _SCRIPTS = ScriptDirectory.from_config(alembic_config())
    return _SCRIPTS


@contextmanager
def locked_connection(engine: Engine):
    """A connection in a transaction that holds the upgrade lock, committed on a clean exit."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        # A connection of its own: the driver's implicit transactions off, so DDL runs inside ours and
        # BEGIN IMMEDIATE takes the write lock before anything is read (a second process waits for it).
        sqlite = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": 120})

        @event.listens_for(sqlite, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None
            dbapi_connection.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(sqlite, "begin")
        def _begin(connection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with sqlite.connect() as connection, connection.begin():
                yield connection
        finally:
            sqlite.dispose()
        return
    with engine.connect() as connection, connection.begin():
        if engine.dialect.name == "postgresql":  # held to the commit; other replicas wait here
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        yield connection
