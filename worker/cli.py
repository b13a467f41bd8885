"""`rigl worker`: start one Celery worker process (prefork, concurrency 1) on the configured broker."""

from __future__ import annotations

import argparse


def add_command(subparsers) -> None:
    parser = subparsers.add_parser("worker", help="run a training worker (Celery) against RIGL_BROKER_URL")
    parser.add_argument("--name", default="rigl@%h", help="Celery node name")
    parser.add_argument("--loglevel", default="INFO")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from worker.app import app
    from store.settings import get_settings

    settings = get_settings()
    argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "1",
            "--queues", settings.queue, "--hostname", args.name, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0
