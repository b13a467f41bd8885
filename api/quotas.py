"""Storage quotas as the API answers them: 413 `quota_exceeded` naming the quota and the owner's usage.

The rule and the counting are store/quotas.py's; this turns a refusal into the one error shape, and
gives uploads an early answer from their Content-Length before a byte of the body is stored.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.context import Context
from api.errors import ApiError
from store import quotas
from store.quotas import QuotaExceeded

NAMES = {"weights": "uploaded weights", "datasets": "uploaded datasets", "artifacts": "job artifacts"}


def quota_error(exc: QuotaExceeded, field: str | None = "body") -> ApiError:
    """413 with `quota`: the kind, the owner's bytes and count, and the limits (as GET /v1/usage)."""
    usage = exc.usage
    return ApiError(413, "quota_exceeded", f"storage quota of {NAMES[usage.kind]} reached: {exc.over}; delete "
                                           "some to make room (GET /v1/usage shows what you hold)", field,
                    extra={"quota": {"kind": usage.kind, **usage.as_json()}})


def limits(ctx: Context) -> dict[str, quotas.Quota]:
    return quotas.quotas(ctx.settings)


async def refuse_upload_early(request: Request, ctx: Context, kind: str) -> None:
    """413 before the body is read when the owner can't keep one more file of `kind`, or not as many
    bytes as the request's Content-Length declares (a body without one is checked once stored)."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    try:
        await run_in_threadpool(quotas.precheck, ctx.store.sessions, ctx.principal, kind, limits(ctx)[kind], size)
    except QuotaExceeded as exc:
        raise quota_error(exc) from None
