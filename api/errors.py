"""One error shape for every 4xx: `{"error": {"code", "message", "field"}}`. A 5xx is a bug, except the
503 of an unavailable database and the 501 of a missing optional package (both say what to do)."""

from __future__ import annotations

import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rigl_core.optional import MissingExtra

# What a body that is not JSON is told (someone POSTing a YAML JobSpec file with curl, say).
SEND_JSON = "send JSON (Content-Type: application/json); the CLI converts YAML (`rigl submit job.yaml`)"
FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]-]*): (.*)$", re.S)


class JSONResponse(_JSONResponse):
    """An error body as ASCII JSON: a message that echoes what the client sent (a name read from an
    uploaded file, say) can hold any character, a lone surrogate included, and must still render."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        """`extra`: more members of the error object (e.g. `quota` of a quota_exceeded)."""
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers
        self.extra = extra


def from_value_error(exc: Exception, status: int = 422, code: str = "invalid_job") -> ApiError:
    """rigl_core errors read 'field: message'; keep the field apart."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    match = FIELD_PREFIX.match(text)
    if match:
        return ApiError(status, code, match.group(2), field=match.group(1))
    return ApiError(status, code, text)


def _loc_to_field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def named_field(field: str, message: str) -> tuple[str, str]:
    """(field, message) of a validation error at `field`: a whole-spec rule (e.g. sparsity.init vs
    model.weights, at "body"), or a section's cross-field rule (sparsity.pattern inside `sparsity`), names
    its own field at the start of its message."""
    named = FIELD_PREFIX.match(message) if field == "body" or message.startswith(field + ".") else None
    if named and "." in named.group(1):
        return named.group(1), named.group(2)
    return field, message


def _body(code: str, message: str, field: str | None, extra: dict | None = None) -> dict:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    error.update(extra or {})
    return {"error": error}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(_body(exc.code, exc.message, exc.field, exc.extra), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            return JSONResponse(_body("invalid_json", f"body is not valid JSON ({message}): {SEND_JSON}", "body"), 422)
        if tuple(first.get("loc", ())) == ("body",) and not is_json(request.headers.get("content-type")):
            # FastAPI parses only a JSON content type; any other body (YAML, none) reached the model as bytes
            content_type = request.headers.get("content-type")
            sent = f"as {content_type}" if content_type else "without a Content-Type"
            return JSONResponse(_body("unsupported_media_type", f"the body was sent {sent}: {SEND_JSON}",
                                      "Content-Type"), 415)
        details = [
            {"field": _loc_to_field(e["loc"]), "message": str(e["msg"]).removeprefix("Value error, ")}
            for e in exc.errors()
        ]
        field, named = named_field(_loc_to_field(first["loc"]), message)
        if named != message:
            message = named
            details[0] = {"field": field, "message": message}
        body = _body("invalid_request", message, field)
        body["error"]["details"] = details
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ValidationError)
    async def _pydantic(_request: Request, exc: ValidationError):
        first = exc.errors()[0]
        return JSONResponse(_body("invalid_request", first["msg"].removeprefix("Value error, "),
                                  _loc_to_field(first["loc"])), status_code=422)

    @app.exception_handler(MissingExtra)
    async def _missing_extra(_request: Request, exc: MissingExtra):
        """A request for a feature whose optional package this server lacks (a timm/ model without the
        'models' extra): the install hint as JSON, on every route. 501, not 503: retrying cannot help
        (the client retries 503s), and the operator, not the request, has to change."""
        body = _body("missing_extra", str(exc), None)
        body["error"]["extra"] = exc.extra
        return JSONResponse(body, status_code=501)

    from sqlalchemy.exc import OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _database(_request: Request, exc: Exception):
        """The database refused or dropped the connection, or every pooled connection stayed busy: a
        retryable 503 (nothing was changed), not a 500. Any other OperationalError is a bug and stays one."""
        if isinstance(exc, OperationalError) and not database_unavailable(exc):
            raise exc
        return JSONResponse(_body("database_unavailable", "the database is unavailable or overloaded; retry shortly",
                                  None), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return JSONResponse(_body(codes.get(exc.status_code, "http_error"), str(exc.detail), None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))


def is_json(content_type: str | None) -> bool:
    """application/json or a +json type, parameters (charset) aside."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def database_unavailable(exc: Exception) -> bool:
    """PostgreSQL's OperationalError is always about the server or the connection (refused, too many
    clients, terminated, lock timeout); SQLite's only when the file is locked or cannot be opened
    ("no such column" is a schema bug)."""
    module = type(getattr(exc, "orig", None)).__module__ or ""
    if module.startswith(("psycopg", "psycopg2")):
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "unable to open database" in text
