"""Request ids, the access log and the log format (readable text or JSON lines).

Every request gets an id: the caller's `X-Request-ID` when it is a short token, a fresh one
otherwise; it is echoed in the response and carried by every log line written while the request
runs (a context variable), so one grep finds a request's lines in the API's logs. Job ids travel
the same way in the worker (worker/metrics.py sets `job_id_var`).

One access-log line per request (logger `rigl.access`): method, route template, status, duration,
request id and the API key's id, never the key itself. Lines are JSON (`RIGL_LOG_FORMAT=json`, for
log shippers) or one readable line each (the default, for `rigl serve` in a terminal).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
import time
import uuid

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rigl_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rigl_job_id", default=None)
access_log = logging.getLogger("rigl.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # anything else (spaces, quotes, newlines) is replaced


def _timestamp(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(timespec="milliseconds")


class ContextFilter(logging.Filter):
    """Stamps request_id and job_id (from the context variables) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, explicit offset), level, logger, message, request_id, job_id,
    the access fields for access lines, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _timestamp(record.created), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), "request_id": getattr(record, "request_id", None),
                "job_id": getattr(record, "job_id", None)}
        line.update(getattr(record, "access", None) or {})
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`2026-11-26T12:00:00.123+00:00 INFO rigl.access GET /v1/jobs/{job_id} 200 3.1 ms [req=… key=…]`"""

    def format(self, record: logging.LogRecord) -> str:
        tags = " ".join(f"{name}={value}" for name, value in (("req", getattr(record, "request_id", None)),
                                                                ("job", getattr(record, "job_id", None)))
                        if value)
        text = f"{_timestamp(record.created)} {record.levelname:<5} {record.name} {record.getMessage()}"
        text += f" [{tags}]" if tags else ""
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(fmt: str = "text", level: str | int = "INFO", stream=None) -> logging.Handler:
    """One handler on the root logger (replacing one this function installed before)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "rigl_handler", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.rigl_handler = True
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    if logging.getLogger("alembic").level == logging.NOTSET:  # a line per migration plugin at every start
        logging.getLogger("alembic").setLevel(logging.WARNING)
    return handler


def route_template(scope) -> str:
    """The matched route's path template (`/v1/jobs/{job_id}`): bounded, unlike raw paths."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    app = scope.get("app")
    from starlette.routing import Match

    for candidate in getattr(getattr(app, "router", None), "routes", ()):  # refused before routing (413, Host)
        try:
            if candidate.matches(scope)[0] != Match.NONE:
                return candidate.path
        except Exception:  # noqa: BLE001 - a mount or an odd route: keep looking
            continue
    return "<unmatched>"


class RequestLog:
    """ASGI middleware, outermost: request id in and out, one access-log line per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                route = route_template(scope)
                ms = (time.perf_counter() - started) * 1000
                state = scope.get("state") or {}
                access_log.info("%s %s %d %.1f ms", scope["method"], route, status, ms,
                                extra={"request_id": request_id, "access": {
                                    "method": scope["method"], "route": route, "path": scope["path"],
                                    "status": status, "duration_ms": round(ms, 2),
                                    "key_id": state.get("key_id"),
                                    "client": (scope.get("client") or (None,))[0]}})
            request_id_var.reset(token)
