"""Request ids and the access log.

Every request gets an id: the caller's `X-Request-ID` when it is a short token, a fresh one
otherwise; it is echoed in the response and carried by every log line written while the request
runs (`request_id_var`, service_common/log_context.py, which also holds the line format), so one
grep finds a request's lines in the API's logs.

One access-log line per request (logger `rigl.access`): method, route template, status, duration,
request id and the API key's id, never the key itself.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from service_common.log_context import request_id_var

access_log = logging.getLogger("rigl.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # anything else (spaces, quotes, newlines) is replaced


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
