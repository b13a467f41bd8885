"""`GET /v1/usage`: what the calling owner stores against each storage quota (store/quotas.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.context import Context, get_context
from api.quotas import limits
from store import quotas

router = APIRouter(prefix="/v1", tags=["resources"])


@router.get("/usage")
def get_usage(ctx: Context = Depends(get_context)) -> dict:
    """Per kind (weights, datasets, artifacts): bytes and count held, and the quota's max_bytes and
    max_count (null: none). Always the caller's own, an admin's included."""
    usage = quotas.usage(ctx.store.sessions, ctx.principal, limits(ctx))
    return {"object": "usage", "owner": ctx.principal, **{kind: value.as_json() for kind, value in usage.items()}}
