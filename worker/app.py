"""The worker's Celery app: built on demand from the settings, never at import.

`rigl worker` (worker/cli.py) builds its own with `worker_app`; `celery -A worker.app …` (the compose
and Dockerfile health checks) finds the module attribute `app`, made on first access.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from service_common.celery_app import make_celery
from store.settings import Settings, get_settings

TASK_MODULES = ("worker.tasks",)  # what a worker imports when it starts: the training task


def worker_app(settings: Settings) -> Celery:
    """A Celery app on `settings`' broker that runs the training task."""
    return make_celery(settings, include=TASK_MODULES)


@lru_cache(maxsize=1)
def _environment_app() -> Celery:
    return worker_app(get_settings())


def __getattr__(name: str):
    """`worker.app.app`, for the Celery CLI's `-A worker.app`: the app of the environment's settings."""
    if name == "app":
        return _environment_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
