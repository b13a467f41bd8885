"""Prometheus metrics at the API's `/metrics`: request latency, and the job queue read from the database.

- `rigl_http_request_duration_seconds{method, route, status}`: a histogram per route *template*
  (`/v1/jobs/{job_id}`, never the raw path) and status class (`2xx`), so its series stay bounded
  whatever clients send; a path no route matches is `<unmatched>`. (An event stream's duration is
  its whole life: read that route's series apart.)
- Jobs by status, queue depth, the age of the oldest waiting job and active jobs per owner, counted
  in the database when Prometheus scrapes (the database is the job record: every API process reports
  the same numbers, and nothing drifts after a restart). The counts are reused for
  `metrics_cache_seconds`, and concurrent scrapes wait on one lock, so a scrape storm costs one set of
  queries per interval.
- In `rigl serve` the worker's series too (its prometheus_client multiprocess folder,
  `worker_metrics_dir`; worker/metrics.py), so the embedded mode has a single scrape target.

Owners are labelled by a keyed hash (`owner="h:<12 hex>"`, HMAC-SHA256 with the server's label key,
store/server_key.py), not by name: owner names are whatever an admin typed (often an e-mail), a metrics
endpoint is read by more people and systems than the API's data, and a plain sha256 of a guessable name
is reversed by hashing guesses. An operator who knows a name finds its series with
`printf %s NAME | openssl dgst -sha256 -hmac "$(cat DATA_DIR/secrets/metrics_label_key)" | …` (first 12 hex).
With the hash the endpoint exposes only aggregate counts, so it is open by default like `/healthz`
(Prometheus scrapes it over the internal network); set `metrics_token` (`RIGL_METRICS_TOKEN`) to ask
for `Authorization: Bearer <token>` where the API port is public.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.errors import ApiError
from api.request_log import route_template
from service_common.bearer import bearer_allows
from store.db import Job
from store.job_state import ACTIVE, CLAIMABLE, TERMINAL
from store.jobs import JobStore
from store.server_key import keyed_label, label_key
from store.settings import Settings

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUSES = (*ACTIVE, *TERMINAL)  # every status gets a series, 0 included, so dashboards see no gaps


class JobsCollector(Collector):
    """Job counts from the database at scrape time, cached for `ttl` seconds."""

    def __init__(self, store: JobStore, ttl: float, key: bytes):
        self.store, self.ttl, self.key = store, ttl, key
        self.lock = threading.Lock()
        self.cached: tuple[float, dict] | None = None

    def read(self) -> dict:
        with self.lock:  # concurrent scrapes: one runs the queries, the others take its result
            if self.cached is not None and time.monotonic() - self.cached[0] < self.ttl:
                return self.cached[1]
            started = time.perf_counter()
            try:
                with self.store.sessions() as s:
                    by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                    owners = s.execute(select(Job.owner, func.count()).where(Job.status.in_(ACTIVE))
                                       .group_by(Job.owner)).all()
                    oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status.in_(CLAIMABLE)))
                data = {"up": 1, "by_status": by_status, "owners": owners, "oldest": oldest}
            except Exception:  # noqa: BLE001 - the database is down: say so, keep serving the rest
                data = {"up": 0}
            data["seconds"] = time.perf_counter() - started
            self.cached = (time.monotonic(), data)
            return data

    def collect(self):
        data = self.read()
        up = GaugeMetricFamily("rigl_metrics_database_up", "1 if the last job count query succeeded")
        up.add_metric([], data["up"])
        yield up
        took = GaugeMetricFamily("rigl_metrics_database_query_seconds", "How long the last job count queries took")
        took.add_metric([], data["seconds"])
        yield took
        if not data["up"]:
            return
        by_status = data["by_status"]
        jobs = GaugeMetricFamily("rigl_jobs", "Jobs in the database by status", labels=["status"])
        for status in sorted({*STATUSES, *by_status}):
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        depth = GaugeMetricFamily("rigl_queue_depth", "Jobs waiting to start (queued or requeued)")
        depth.add_metric([], sum(by_status.get(s, 0) for s in CLAIMABLE))
        yield depth
        age = GaugeMetricFamily("rigl_queue_oldest_age_seconds",
                                "Age of the oldest waiting job, since its submission (0: none waits)")
        oldest = data["oldest"]
        if oldest is not None and oldest.tzinfo is None:  # SQLite hands back naive UTC
            oldest = oldest.replace(tzinfo=dt.timezone.utc)
        age.add_metric([], 0.0 if oldest is None else
                       max(0.0, (dt.datetime.now(dt.timezone.utc) - oldest).total_seconds()))
        yield age
        active = GaugeMetricFamily("rigl_owner_active_jobs", "Queued and running jobs per owner (hashed name)",
                                   labels=["owner"])
        for owner, count in data["owners"]:
            active.add_metric([keyed_label(self.key, owner)], count)
        yield active


class RequestMetrics:
    """ASGI middleware: observes every HTTP request's duration under its route template."""

    def __init__(self, app, histogram: Histogram):
        self.app, self.histogram = app, histogram

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observe_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe_status)
        finally:
            self.histogram.labels(scope["method"], route_template(scope), f"{status // 100}xx").observe(
                time.perf_counter() - started)


def build_registry(settings: Settings, store: JobStore) -> tuple[CollectorRegistry, Histogram]:
    """A registry per app (tests build many apps in one process): request histogram, job counts,
    this process's CPU/memory, and the embedded worker's series when there is one."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=True)
    histogram = Histogram("rigl_http_request_duration_seconds", "API request latency by route template",
                          ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=registry)
    registry.register(JobsCollector(store, settings.metrics_cache_seconds, label_key(settings)))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    if settings.worker_metrics_dir is not None:
        from service_common.metrics_folder import FolderCollector

        folder = settings.worker_metrics_dir.expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        FolderCollector(registry, path=str(folder))
    return registry, histogram


def install(app: FastAPI, settings: Settings, store: JobStore) -> None:
    """Mount `/metrics` and the latency middleware (nothing at all when `settings.metrics` is off)."""
    if not settings.metrics:
        return
    registry, histogram = build_registry(settings, store)
    app.state.metrics_registry = registry
    token = settings.metrics_token

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:  # plain def: the job counts may wait on the database
        if not bearer_allows(request.headers.get("authorization"), token):
            raise ApiError(401, "unauthorized", "/metrics wants Authorization: Bearer <RIGL_METRICS_TOKEN>",
                           "Authorization", headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMetrics, histogram=histogram)
