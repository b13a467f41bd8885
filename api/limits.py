"""Request body cap enforced on the bytes actually received (chunked bodies included), not on headers."""

from __future__ import annotations

import json


class BodyLimit:
    """ASGI middleware: buffers a request body up to `max_bytes` and answers 413 past it.

    `exempt` (method, path-prefix) pairs stream their bodies themselves with their own cap (uploads).
    """

    def __init__(self, app, max_bytes: int, exempt: tuple[tuple[str, str], ...] = ()):
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(scope["method"] == m and scope["path"].startswith(p)
                                          for m, p in self.exempt):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)  # a disconnect: pass it on
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._reject(send)
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            if chunks:
                return chunks.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps({"error": {"code": "too_large", "message": f"request body over {self.max_bytes} bytes",
                                     "field": "body"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
