"""`rigl worker`: start one Celery worker process (prefork, concurrency 1) on the configured broker, listening
for the slot classes its devices can serve (worker/devices.py)."""

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
    from worker.devices import check_visible_gpus, owned_devices, worker_queues

    settings = get_settings()
    check_visible_gpus(settings)  # before any job: an 'all' job uses exactly the GPUs this worker owns
    queues = worker_queues(settings.queue, owned_devices(settings))  # slot classes 1 … devices
    argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "1",
            "--queues", ",".join(queues), "--hostname", args.name, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0
