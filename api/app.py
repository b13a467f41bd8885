"""The FastAPI application: `/v1` routes, health probes, errors in one JSON shape."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from api import errors
from api.context import Context, celery_enqueue
from api.limits import BodyLimit
from api.routes import jobs, resources
from store.artifacts import Artifacts
from store.jobs import JobStore
from store.settings import Settings, get_settings


def create_app(settings: Settings | None = None, enqueue=None) -> FastAPI:
    settings = (settings or get_settings()).resolved()
    store = JobStore(settings.database_url)
    context = Context(settings=settings, store=store, artifacts=Artifacts(settings.artifact_dir),
                      enqueue=enqueue or celery_enqueue(settings))
    app = FastAPI(title="RigL Service", version="0.1.0",
                  description="Train sparse networks with RigL: submit jobs, watch them, download sparse checkpoints.")
    app.state.context = context
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(resources.router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        try:
            store.ping()
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            return JSONResponse({"status": "unavailable", "database": str(exc).splitlines()[0]}, status_code=503)
        return {"status": "ok", "database": "ok"}

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, exempt=(("POST", "/v1/datasets"),))
    return app
