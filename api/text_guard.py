"""One rule for every text the API reads: no NUL character and no unpaired UTF-16 surrogate.

Why at the request, not per field: PostgreSQL refuses a NUL in a text value and neither database
driver (nor the JSON encoder of an error message echoing the value) can encode a lone surrogate
(`"\\ud800"`), so such a string, wherever it sits, became a 500 deep inside a route and the keep-alive
connection was dropped. Checking the query string, the path, the headers and the decoded JSON body
once, before routing, covers every field of every model, present and future, and answers 422 with
the field's name (`grid.method.0`, `name_prefix`, `Idempotency-Key`).

A JSON body is only decoded again when its bytes could hold such a string (a `\\u` escape, a NUL
byte, or the UTF-8 form of a surrogate, which Python's JSON reader lets through): most bodies pass
on one byte scan. Streamed uploads (`exempt`) carry binary files: their bodies are not read here.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
MAYBE_BAD_JSON = re.compile(rb"\\u|\x00|\xed[\xa0-\xbf]")  # a \u escape, a NUL byte, a UTF-8 surrogate


def problem(text: str) -> str | None:
    """What is wrong with `text`, or None when it is acceptable."""
    found = BAD_TEXT.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain a NUL character (\\u0000)"
    return f"must not contain an unpaired surrogate (\\u{ord(found.group()):04x}); send text as valid UTF-8"


def shown(text: str) -> str:
    """`text` with its refused characters written as escapes: safe to put in a JSON error."""
    return BAD_TEXT.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def first_bad_json(value) -> tuple[str, str] | None:
    """(dotted field, problem) of the first string (key or value) that breaks the rule, walking the
    decoded body without recursion (a deeply nested body can't overflow the stack here)."""
    stack: list[tuple[tuple, object]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if (issue := problem(item)) is not None:
                return ".".join(map(str, path)) or "body", issue
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if (issue := problem(key)) is not None:
                    return ".".join(map(str, (*path, shown(key)))), f"a key {issue}"
                stack.append(((*path, key), child))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
    return None


def first_bad_request_text(scope) -> tuple[str, str] | None:
    """(field, problem) for the path, a query parameter or a header that breaks the rule."""
    if (issue := problem(scope.get("path", ""))) is not None:
        return "path", issue
    query = scope.get("query_string", b"").decode("latin-1")
    for key, value in parse_qsl(query, keep_blank_values=True):  # decoded as Starlette decodes them
        if (issue := problem(key) or problem(value)) is not None:
            return shown(key), issue
    for name, value in scope.get("headers", ()):
        if b"\x00" in value:  # header bytes are latin-1: NUL is the only refused character they can hold
            return name.decode("latin-1").title(), "must not contain a NUL character (\\u0000)"
    return None


class TextGuard:
    """ASGI middleware, inside BodyLimit (the body it reads is already capped): 422 `invalid_text`."""

    def __init__(self, app, exempt: tuple[tuple[str, str], ...] = ()):
        self.app, self.exempt = app, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        bad = first_bad_request_text(scope)
        if bad is not None:
            return await self._reject(send, *bad)
        if any(scope["method"] == m and scope["path"].startswith(p) for m, p in self.exempt):
            return await self.app(scope, receive, send)
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        if MAYBE_BAD_JSON.search(body):
            try:
                decoded = json.loads(body)
            except (ValueError, RecursionError):
                decoded = None  # not JSON: the route answers it (invalid_json, or its own parsing)
            bad = first_bad_json(decoded)
            if bad is not None:
                return await self._reject(send, *bad)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send, field: str, issue: str):
        body = json.dumps({"error": {"code": "invalid_text", "message": f"{field}: {issue}", "field": field}}).encode()
        await send({"type": "http.response.start", "status": 422,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
