"""The reaper in every worker, so jobs of dead workers come back even when no API is running.

Started in the worker's main process once it is ready (not in the pool processes that train), and
stopped on shutdown. Every API replica and worker runs one; the database lock in store/leader.py lets
exactly one of them act at a time.
"""

from __future__ import annotations

from celery.signals import worker_ready, worker_shutdown

_running: list = []


@worker_ready.connect
def start_worker_reaper(sender=None, **_kwargs) -> None:
    from service_common.celery_app import enqueue_train
    from store.jobs import JobStore
    from store.reaper import start_reaper
    from store.settings import get_settings

    settings = get_settings()
    if not settings.reaper or _running:
        return
    app = sender.app

    def enqueue(job_id: str) -> None:
        enqueue_train(app, job_id, settings.queue)

    _running.append(start_reaper(JobStore(settings.database_url, settings), enqueue, settings.database_url,
                                 settings.lease_seconds, settings.reaper_interval_seconds))


@worker_shutdown.connect
def stop_worker_reaper(**_kwargs) -> None:
    while _running:
        _running.pop().stop()
