"""The schema check every long-lived process makes before it starts (`rigl serve`, `rigl worker`): one
rule, so a worker can't start on a schema the API refuses.

The check is the one opening the database does (store/engine.py `make_engine` → store/migrations
`ensure_schema`): at head, nothing; behind, upgrade, or with `RIGL_DB_AUTO_UPGRADE=0` refuse (exit 2,
naming `rigl db upgrade`); newer (a rolling deploy's old replica), go on. It used to run in the worker only
when a job came: the worker started, took messages and failed each run instead of refusing to start.
"""

from __future__ import annotations

import logging
import sys

from store.migrations import SchemaBehind, schema_state

log = logging.getLogger("rigl.schema")


def schema_refuses_start(settings, program: str) -> bool:
    """True (after saying why on stderr and in the log) when `program` must not start on this database."""
    from store.engine import make_engine

    try:
        engine = make_engine(settings.database_url, settings)
    except SchemaBehind as exc:
        log.error("%s: %s", program, exc)
        print(f"{program}: {exc}", file=sys.stderr, flush=True)
        return True
    try:
        state = schema_state(engine)
        if state.at_head:
            log.info("database schema at %s, no upgrade needed", state.current)
    finally:
        engine.dispose()
    return False
