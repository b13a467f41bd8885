"""`rigl worker`: start one Celery worker process (prefork, concurrency 1) on the configured broker, listening
for the slot classes its devices can serve (worker/devices.py)."""

from __future__ import annotations

import argparse

from rigl_core.optional import SERVICE_MODULES, add_unavailable_command, missing


def add_command(subparsers) -> None:
    help = "run a training worker (Celery) against RIGL_BROKER_URL"
    if absent := missing(*SERVICE_MODULES):  # a library-only install: say what to install
        return add_unavailable_command(subparsers, "worker", "service", absent, help)
    parser = subparsers.add_parser("worker", help=help)
    parser.add_argument("--name", default="rigl@%h", help="Celery node name")
    parser.add_argument("--loglevel", default="INFO")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from service_common.log_context import configure_logging
    from store.settings import get_settings
    from worker.app import worker_app
    from worker.devices import check_visible_gpus, owned_devices, worker_queues

    settings = get_settings()
    check_visible_gpus(settings)  # before any job: an 'all' job uses exactly the GPUs this worker owns
    queues = worker_queues(settings.queue, owned_devices(settings))  # slot classes 1 … devices
    from worker.metrics import setup as setup_metrics

    handler = configure_logging(settings.log_format, args.loglevel.upper())  # text or JSON lines, with job_id
    from store.startup import schema_refuses_start

    if schema_refuses_start(settings, "rigl worker"):  # the API's rule: never start on a schema behind
        return 2
    setup_metrics(settings.worker_metrics_dir, settings.worker_metrics_port,  # before Celery forks its pool
                  settings.worker_metrics_host, settings.metrics_token)
    from worker.log_output import QUIET_ARGS, take_over

    app = worker_app(settings)
    take_over(app, handler)  # Celery's banner, prints and notices as log lines too (worker/log_output.py)
    argv = [*QUIET_ARGS, "worker", "--pool", "prefork", "--concurrency", "1", "--max-tasks-per-child", "1",
            "--queues", ",".join(queues), "--hostname", args.name, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0
