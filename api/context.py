"""What every route needs: settings, the store, artifacts and a way to enqueue a job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fastapi import Request

from store.artifacts import Artifacts
from store.jobs import JobStore
from store.settings import Settings


@dataclass
class Context:
    settings: Settings
    store: JobStore
    artifacts: Artifacts
    enqueue: Callable[[str], None]
    owner: str | None = None  # auth comes later; None sees everything


def get_context(request: Request) -> Context:
    return request.app.state.context


def celery_enqueue(settings: Settings) -> Callable[[str], None]:
    """Send `rigl.train(job_id)` by name: the API never imports the task code."""
    from worker.app import make_celery

    app = make_celery(settings)

    def enqueue(job_id: str) -> None:
        app.send_task("rigl.train", args=[job_id], queue=settings.queue)

    return enqueue
