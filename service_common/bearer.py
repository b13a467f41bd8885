"""The one rule for a `/metrics` token (`RIGL_METRICS_TOKEN`), shared by the API's endpoint and the worker's
port: `Authorization: Bearer <token>`, compared in constant time; no token configured: open."""

from __future__ import annotations

import hmac


def bearer_allows(header: str | None, token: str | None) -> bool:
    """True when `token` is unset, or `header` (the Authorization value) is `Bearer <token>`."""
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
