"""OpenTelemetry for the tracing tests: an in-memory exporter on a fresh global provider (undone afterwards, so
no later test in the process traces), and a real OTLP/HTTP receiver for traces exported by other processes."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


def reset_global_provider() -> None:
    """Forget the process's global tracer provider. OpenTelemetry sets it once per process; its own tests
    reset these two private names the same way."""
    from opentelemetry import trace
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@contextmanager
def memory_spans(service: bool = False) -> Iterator[object]:
    """Yields an InMemorySpanExporter that gets every span of this process until the block ends: through
    service_common.tracing.setup (`service`: the service's instrumentation too), or a plain SDK provider."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    reset_global_provider()
    try:
        if service:
            from service_common import tracing

            assert tracing.setup("rigl-test", exporter=exporter)
        else:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
        yield exporter
    finally:
        if service:
            tracing.shutdown()
        reset_global_provider()


@dataclass
class ReceivedSpan:
    """One span as an OTLP receiver decoded it (ids as hex)."""

    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    links: list[str]  # the span ids it links to
    attributes: dict = field(default_factory=dict)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """A tiny OTLP/HTTP trace receiver: POST /v1/traces (protobuf), decoded with opentelemetry-proto."""

    def __init__(self, port: int = 0):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse)

        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        lock, received = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/traces" or self.headers.get("Content-Encoding"):
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    received.requests += 1
                    for resource_spans in request.resource_spans:
                        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                received.spans.append(ReceivedSpan(
                                    span.name, resource.get("service.name"), span.trace_id.hex(),
                                    span.span_id.hex(), span.parent_span_id.hex(),
                                    [link.span_id.hex() for link in span.links],
                                    {a.key: _value(a.value) for a in span.attributes}))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "OtlpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in list(self.spans) if span.name == name]
