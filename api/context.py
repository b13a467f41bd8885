"""What every route needs: settings, the store, artifacts and a way to enqueue a job."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from fastapi import Request

from api.errors import ApiError
from store.artifacts import Artifacts
from store.jobs import JobStore
from store.settings import Settings


@dataclass
class Context:
    settings: Settings
    store: JobStore
    artifacts: Artifacts
    enqueue: Callable[[str], None]
    owner: str | None = None  # whose objects this request may see; None: all (admin, or auth off)
    principal: str = "local"  # who is asking; owns what this request creates


def get_context(request: Request) -> Context:
    """Authenticates the request (Bearer API key) when auth is on; 401 otherwise."""
    base: Context = request.app.state.context
    if not base.settings.auth:
        return base
    from store.keys import authenticate

    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    principal = authenticate(base.store, key.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        raise ApiError(401, "unauthorized", "missing, unknown or revoked API key (Authorization: Bearer …)",
                       "Authorization", headers={"WWW-Authenticate": "Bearer"})
    request.state.key_id = principal.key_id  # for the access log (api/request_log.py): the key's id, never the key
    return replace(base, owner=None if principal.admin else principal.owner, principal=principal.owner)


def celery_enqueue(settings: Settings) -> Callable[[str], None]:
    """Send the training task by name (service_common/celery_app.py): the API never imports the task code."""
    from service_common.celery_app import enqueue_train, make_celery

    app = make_celery(settings)

    def enqueue(job_id: str) -> None:
        enqueue_train(app, job_id, settings.queue)

    return enqueue
