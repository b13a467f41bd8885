"""The FastAPI application: `/v1` routes, health probes, errors in one JSON shape."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from api import dashboard, errors
from api.context import Context, celery_enqueue
from api.janitor import Janitor
from api.limits import BodyLimit
from api.model_build import start_early
from api import metrics
from api.request_log import RequestLog
from api.text_guard import TextGuard
from api.origin_guard import OriginGuard, split_list
from api.routes import jobs, programs, registry, resources, sweeps, usage, webhooks, weights
from api.webhook_sender import WebhookSender
from service_common import tracing
from store.artifacts import Artifacts
from store.reaper import start_reaper
from store.jobs import JobStore
from store.settings import Settings, get_settings

STREAMED_UPLOADS = (("POST", "/v1/datasets"), ("POST", "/v1/weights"),  # routes that read their raw body themselves
                    ("POST", "/v1/architectures/program"))


def create_app(settings: Settings | None = None, enqueue=None, reaper: bool = True) -> FastAPI:
    settings = (settings or get_settings()).resolved()
    tracing.setup("rigl-api")  # OTEL_EXPORTER_OTLP_ENDPOINT: traces over OTLP; before the engine, whose SQL it traces
    store = JobStore(settings.database_url, settings)
    context = Context(settings=settings, store=store, artifacts=Artifacts.from_settings(settings),
                      enqueue=enqueue or celery_enqueue(settings))
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        context.artifacts.remove_orphan_uploads(settings.orphan_upload_seconds)  # left by a crash mid-upload
        lost_job_reaper = janitor = sender = None
        if reaper:  # a serving app (rigl serve, uvicorn): also get the model checker's fork server ready
            start_early()
            if settings.reaper:  # one process acts at a time (store/leader.py); workers run it too
                lost_job_reaper = start_reaper(store, context.enqueue, settings.database_url, settings.lease_seconds,
                                       settings.reaper_interval_seconds, settings.max_active_jobs_per_owner)
            janitor = Janitor(store, context.artifacts, settings.cleanup_interval_seconds, settings.retention_days)
            janitor.start()
            sender = WebhookSender(store, settings)  # every replica: deliveries are taken one at a time
            sender.start()
        yield
        if sender is not None:
            sender.stop()
        if lost_job_reaper is not None:
            lost_job_reaper.stop()
        if janitor is not None:
            janitor.stop()

    app = FastAPI(title="RigL Service", version="0.1.0", lifespan=lifespan, telemetry=tracing.fastapi_telemetry(),
                  description="Train sparse networks with RigL: submit jobs, watch them, download sparse checkpoints.")
    app.state.context = context
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(registry.router)
    app.include_router(resources.router)
    app.include_router(weights.router)
    app.include_router(programs.router)
    app.include_router(sweeps.router)
    app.include_router(usage.router)
    app.include_router(webhooks.router)
    dashboard.install(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Liveness: answered on the event loop, touching neither the database nor the threadpool, so it
        stays fast while requests wait on a locked table (every route that blocks is a plain `def`)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        try:
            store.ping()
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            return JSONResponse({"status": "unavailable", "database": str(exc).splitlines()[0]}, status_code=503)
        return {"status": "ok", "database": "ok"}

    app.add_middleware(TextGuard, exempt=STREAMED_UPLOADS)  # NUL / lone surrogates in any text: 422
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, exempt=STREAMED_UPLOADS)  # they stream with their own caps
    app.add_middleware(OriginGuard, allowed_hosts=split_list(settings.allowed_hosts),  # Host, cross-site
                       allowed_origins=split_list(settings.allowed_origins))
    metrics.install(app, settings, store)  # /metrics + latency histogram (outside the guards: refusals count)
    app.add_middleware(RequestLog)  # outermost: request id and access log for every request
    return app
