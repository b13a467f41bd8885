"""OpenTelemetry traces for the API and the worker, exported over OTLP when the environment asks for it.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (or
`OTEL_TRACES_EXPORTER` names `otlp` or `console`); `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
turns it off again. Off, nothing is instrumented and opentelemetry's SDK is never imported: a request or a
training step pays nothing. On, it needs the `otel` extra (a missing extra is one warning, never an error).

What is traced: HTTP requests (FastAPI's own telemetry), SQL statements (SQLAlchemy), task messages
published and run (Celery), and each job run in the worker (`job_span`), under which the Trainer's epochs and
mask updates are spans (rigl_core/integrations/tracing.py). One job is one trace, from its `POST /v1/jobs`
to its last epoch: the request's W3C trace context is stored with the job (`jobs.trace_context`) and the
worker's job span continues it. A worker's Celery message is a slot for whichever job is fairest
(worker/tasks.py), often not the job it was sent for, so the message's own trace is only linked.

This is the one module of the service that imports opentelemetry; the standard OTEL_* variables (service
name, resource attributes, sampler, headers, batch sizes) work as the SDK documents them.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger("rigl.tracing")
EXCLUDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: noise in every trace

_provider = None  # this process's SDK TracerProvider once tracing is on
_instrumented: list = []  # the instrumentors to undo in shutdown()
_warned = False


def requested(environ=os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces (the SDK's own defaults would export to localhost:4318 even
    when nobody set anything; here nothing set means off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return False
    return bool(exporters & {"otlp", "console"} or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def enabled() -> bool:
    return _provider is not None


def setup(service_name: str, exporter: Any = None) -> bool:
    """Turn tracing on for this process if the environment asks for it (or `exporter`, a SpanExporter, is
    given: tests), once; returns whether it is on. A process whose global tracer provider is already an SDK
    one (`opentelemetry-instrument rigl serve`, a test) keeps that provider and its exporters."""
    global _provider, _warned
    if _provider is not None:
        return True
    if exporter is None and not requested():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as error:
        if not _warned:
            _warned = True
            log.warning("OpenTelemetry is configured (OTEL_*) but the 'otel' extra is not installed "
                        "(pip install \"rigl-service[otel]\"): tracing is off (%s)", error)
        return False
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        provider = TracerProvider(resource=Resource.create(attributes),  # sampler: OTEL_TRACES_SAMPLER
                                  id_generator=_system_ids())
        provider.sampler = _sampler(provider.sampler)  # before any tracer takes it
        trace.set_tracer_provider(provider)
        if exporter is None:
            for made in _exporters_from_environment():
                provider.add_span_processor(BatchSpanProcessor(made))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider = provider
    _instrument_libraries(provider)
    return True


def _system_ids():
    """Trace and span ids from the operating system's randomness. The SDK's default draws them from Python's
    `random`, which the Trainer seeds (a job's run is reproducible): every job with the same seed, and every
    resumed run of one job, then made the same span ids again."""
    import random

    from opentelemetry.sdk.trace.id_generator import IdGenerator

    system = random.SystemRandom()

    class SystemIds(IdGenerator):
        def generate_span_id(self) -> int:
            return system.getrandbits(64) or 1  # 0 is the invalid id

        def generate_trace_id(self) -> int:
            return system.getrandbits(128) or 1

    return SystemIds()


def _sampler(configured):
    """`configured` (OTEL_TRACES_SAMPLER's), except that a client call outside any span is not traced: the
    database calls of the heartbeats, the reaper's and janitor's polls and the migrations would each start a
    trace of one span every few seconds and bury the requests and jobs (their spans get no attributes before
    this decision, so it goes by kind: the only client spans here are database calls)."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import SpanKind, get_current_span

    class InsideSpansOnly(Sampler):
        def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                          trace_state=None):
            if kind == SpanKind.CLIENT and not get_current_span(parent_context).get_span_context().is_valid:
                return SamplingResult(Decision.DROP)
            return configured.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"InsideSpansOnly{{{configured.get_description()}}}"

    return InsideSpansOnly()


def _exporters_from_environment() -> list:
    """OTLP over HTTP/protobuf (endpoint, headers, timeout, compression from OTEL_EXPORTER_OTLP_*), gRPC when
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL=grpc (it needs opentelemetry-exporter-otlp-proto-grpc), and the
    console exporter for OTEL_TRACES_EXPORTER=console."""
    exporters, names = [], {e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporters.append(ConsoleSpanExporter())
    if "otlp" in names or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") \
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporters.append(OTLPSpanExporter())
    return exporters


def _instrument_libraries(provider) -> None:
    """SQL statements (engines made after this: store/engine.py looks `create_engine` up at call time) and
    Celery's publish and run."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    for instrumentor in (SQLAlchemyInstrumentor(), CeleryInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            # skip_dep_check: the SQLAlchemy instrumentation declares "< 2.1" but traces 2.1 (tests/service/test_tracing.py)
            instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
            _instrumented.append(instrumentor)


def fastapi_telemetry() -> dict:
    """`FastAPI(telemetry=...)`: FastAPI's own OpenTelemetry request spans, on this process's provider when
    tracing is on (health probes and /metrics left out); everything off otherwise, so a request doesn't even
    look the providers up."""
    if _provider is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {"tracer_provider": _provider, "tracing": True, "metrics": False, "logs": False,
            "exclude": lambda scope: scope.get("path") in EXCLUDED_PATHS}


def current_context() -> dict | None:
    """The W3C trace context (`traceparent`, `tracestate`) of the current span, to store with a job; None when
    tracing is off or no span is recording."""
    if _provider is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier or None


@contextmanager
def job_span(job_id: str, attempt: int, stored: dict | None) -> Iterator[Any]:
    """The span of one run of a job in the worker, in the trace of the request that submitted it (`stored`, its
    trace context): under the Celery message's span when the message was the one sent for this job, else a
    child of the request linked to the message's span (another job's slot). Yields the span
    (None when tracing is off) for the outcome; ends it, and exports what is pending (a pool process runs
    one task and exits without running atexit hooks)."""
    if _provider is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    submitted = TraceContextTextMapPropagator().extract(stored) if stored else None
    message = trace.get_current_span().get_span_context()  # Celery's span of the message being run, if any
    if message.is_valid and (submitted is None
                             or trace.get_current_span(submitted).get_span_context().trace_id == message.trace_id):
        parent, links = None, []  # the message sent for this job: nest under it (queue wait, then the run)
    else:  # another job's slot (or none): continue the submitting request, link the message
        parent, links = submitted, [trace.Link(message)] if message.is_valid else []
    tracer = _provider.get_tracer("rigl.worker")
    try:
        with tracer.start_as_current_span("job.run", context=parent, links=links, kind=trace.SpanKind.CONSUMER,
                                          attributes={"rigl.job_id": job_id, "rigl.attempt": attempt}) as span:
            yield span
    finally:
        flush()


def set_outcome(span: Any, outcome: str) -> None:
    """The run's outcome (succeeded, failed, requeued, ...) on its job span."""
    if span is not None:
        span.set_attribute("rigl.outcome", outcome)


def flush(timeout_millis: int = 5000) -> None:
    """Export every finished span now (the end of a task, a process about to exit)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def shutdown() -> None:
    """Flush, undo the library instrumentation and forget the provider (a process's end; tests). The global
    provider stays set: OpenTelemetry allows setting it once per process."""
    global _provider
    flush()
    for instrumentor in _instrumented:
        instrumentor.uninstrument()
    _instrumented.clear()
    _provider = None


def otel_loaded() -> bool:
    """Whether opentelemetry's SDK is imported in this process (the zero-cost check of the tests)."""
    return "opentelemetry.sdk.trace" in sys.modules
