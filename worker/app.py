"""The Celery app: JSON only, acks_late, prefetch 1, one training process per GPU.

The broker is whatever `RIGL_BROKER_URL` says: Redis in compose, kombu's filesystem transport in
the embedded `rigl serve`. Jobs live in the database; Celery only carries job ids.
"""

from __future__ import annotations

from celery import Celery

from store.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("rigl", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict = {"visibility_timeout": settings.visibility_timeout}
    if settings.broker_url.startswith("filesystem://"):
        folder = str(settings.broker_folder)
        transport_options = {"data_folder_in": folder, "data_folder_out": folder, "store_processed": False,
                             "control_folder": str(settings.broker_folder / "control")}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,  # a fresh process per job releases GPU memory
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_time_limit=settings.job_time_limit_seconds,
        # the run itself checkpoints and ends `time_limit` at limit - grace (worker/runner.py); the soft
        # limit is the fallback, half the grace later, and the hard limit the last resort
        task_soft_time_limit=max(1, settings.job_time_limit_seconds - settings.time_limit_grace_seconds // 2),
        visibility_timeout=settings.visibility_timeout,
    )
    return app


app = make_celery()
