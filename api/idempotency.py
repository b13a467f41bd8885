"""Idempotency-Key on POST /v1/jobs and POST /v1/sweeps: the same key and body replay the first answer.

One rule for both: a key names what its first request created (store/idempotency.py); asked again with
the same body, the answer is that object again (with `Idempotent-Replayed: true`); with another body, or
a key that named the other kind of object, a 422.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from fastapi import Response

from api.context import Context
from api.errors import ApiError

T = TypeVar("T")


def replayed(ctx: Context, key: str, digest: str, response: Response, load: Callable[[str], T | None]) -> T | None:
    """What the first request with `key` created, read with `load(id)`; None when the key is unused."""
    record = ctx.store.idempotency.lookup(ctx.principal, key)
    if record is None:
        return None
    found = load(record.job_id) if record.body_sha256 == digest else None
    if found is None:  # another body, or the key named another kind of object
        raise ApiError(422, "idempotency_mismatch", "this Idempotency-Key was used with a different body",
                       "Idempotency-Key")
    response.headers["Idempotent-Replayed"] = "true"
    return found
