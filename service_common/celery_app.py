"""The Celery app both sides use, the training task's name, and the one way to send that task.

JSON only, acks_late, prefetch 1, one training process per GPU. The broker is whatever
`RIGL_BROKER_URL` says: Redis in compose, kombu's filesystem transport in the embedded `rigl serve`.
Jobs live in the database; Celery only carries job ids. The API sends the task by name and never
imports the task's code (worker/tasks.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from store.settings import Settings

TRAIN_TASK = "rigl.train"  # one message = one slot for the fairest claimable job (worker/tasks.py)


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery app on `settings`' broker. `include`: task modules a worker imports when it starts."""
    app = Celery("rigl", broker=settings.broker_url, include=list(include))
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


def enqueue_train(app: Celery, job_id: str, queue: str, countdown: float | None = None) -> None:
    """Send one training slot for `job_id` to `queue`, to start `countdown` seconds from now (None: at once);
    raises when the broker can't be reached: store/dispatch.py turns that into a job left for the reaper."""
    app.send_task(TRAIN_TASK, args=[job_id], queue=queue, countdown=countdown)
