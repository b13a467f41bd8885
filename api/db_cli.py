"""`rigl db upgrade|current|check`: the job database's schema version (runs against RIGL_DATABASE_URL).

Why a command as well as the upgrade on start: with RIGL_DB_AUTO_UPGRADE=0 (several replicas, a
change window) an operator upgrades once, and `check` lets CI or a deploy script ask whether the
database matches this release's models.
"""

from __future__ import annotations

import argparse
import sys

from rigl_core.optional import SERVICE_MODULES, add_unavailable_command, missing


def add_command(subparsers) -> None:
    help = "the job database's schema: upgrade it, show its revision, check it (RIGL_DATABASE_URL)"
    if absent := missing(*SERVICE_MODULES, "alembic"):  # a library-only install: say what to install
        return add_unavailable_command(subparsers, "db", "service", absent, help)
    parser = subparsers.add_parser("db", help=help)
    sub = parser.add_subparsers(dest="db_command", required=True)
    upgrade = sub.add_parser("upgrade", help="apply the migrations this release has (a database made before "
                                             "migrations is recognised and stamped first)")
    upgrade.add_argument("--revision", default="head", help="stop at this revision (default: head)")
    sub.add_parser("current", help="print the database's revision and this release's head")
    sub.add_parser("check", help="exit 0 when the database is at head and matches the models, else 1 with "
                                 "the differences")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine

    from store.migrations import schema_diff, schema_state, upgrade
    from store.settings import Settings

    url = Settings().resolved().database_url
    engine = create_engine(url)  # not make_engine: that would upgrade (or refuse) before we are asked
    try:
        if args.db_command == "upgrade":
            before = schema_state(engine)
            if not before.known:
                print(f"rigl db: error: the database is at {before.current}, newer than this release "
                      f"({before.head}); upgrade rigl instead", file=sys.stderr)
                return 1
            old, new = upgrade(engine, args.revision)
            print(f"database {_where(url)}: {old or 'none'} -> {new}" if old != new
                  else f"database {_where(url)}: already at {new}")
            return 0
        state = schema_state(engine)
        if args.db_command == "current":
            print(f"database {_where(url)}: {state.describe()}")
            return 0
        if not state.at_head:
            print(f"database {_where(url)}: {state.describe()}; run `rigl db upgrade`")
            return 1
        diff = schema_diff(engine)
        for item in diff:
            print(f"differs from the models: {item}")
        print(f"database {_where(url)}: at {state.current}, " + ("matches the models" if not diff
                                                                   else f"{len(diff)} differences"))
        return 1 if diff else 0
    finally:
        engine.dispose()


def _where(url: str) -> str:
    """The URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
