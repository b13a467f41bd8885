"""The log context and line format the API and the worker share: request and job ids on every line,
readable text or JSON lines.

Every log line carries the request id (set by the API's access log middleware, api/request_log.py) and
the job id (set around a run in the worker, worker/metrics.py) from context variables, so one grep finds
a request's or a job's lines. Lines are JSON (`RIGL_LOG_FORMAT=json`, for log shippers) or one readable
line each (the default, for `rigl serve` in a terminal).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rigl_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rigl_job_id", default=None)


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
    logging.captureWarnings(True)  # warnings.warn(...) as `py.warnings` records: one format for every line
    if logging.getLogger("alembic").level == logging.NOTSET:  # a line per migration plugin at every start
        logging.getLogger("alembic").setLevel(logging.WARNING)
    return handler
