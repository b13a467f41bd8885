"""`rigl keys create|list|revoke`: manage API keys directly in the job database (server admins)."""

from __future__ import annotations

import argparse

from rigl_core.optional import SERVICE_MODULES, add_unavailable_command, missing


def add_command(subparsers) -> None:
    help = "manage API keys (runs against RIGL_DATABASE_URL)"
    if absent := missing(*SERVICE_MODULES):  # a library-only install: say what to install
        return add_unavailable_command(subparsers, "keys", "service", absent, help)
    parser = subparsers.add_parser("keys", help=help)
    sub = parser.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--owner", required=True, help="who owns the jobs made with this key")
    create.add_argument("--name", default="", help="a label, e.g. the laptop or CI system")
    create.add_argument("--admin", action="store_true", help="may see every owner's jobs")
    sub.add_parser("list", help="list keys (never the secrets)")
    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from store.jobs import JobStore
    from store.keys import create_key, list_keys, revoke_key
    from store.settings import Settings

    store = JobStore(Settings().resolved().database_url)
    if args.keys_command == "create":
        row, key = create_key(store, args.owner, args.name, args.admin)
        print(key)
        return 0
    if args.keys_command == "list":
        for row in list_keys(store):
            state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
            print(f"{row.id}  owner={row.owner}  {'admin' if row.admin else 'user'}  {state}  {row.name}")
        return 0
    if revoke_key(store, args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"rigl: error: key_id: no active key {args.key_id!r}")
    return 2
