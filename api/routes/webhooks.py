"""Webhooks: an owner's endpoints for job and sweep state changes, their delivery log, a test event.

The URL is checked when the endpoint is created (api/webhook_address.py: a 422 naming `url` for an
address the operator has not allowed) and again before every attempt. The signing secret is in the
creation's answer only. Deliveries are written with the changes they report (store/webhooks.py) and
sent by the API's webhook sender (api/webhook_sender.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from api.context import Context, get_context
from api.errors import ApiError
from api.schemas import iso
from api.webhook_address import MAX_URL, AddressRefused, resolve
from store import webhooks as stored

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., min_length=1, max_length=MAX_URL, description="http(s) URL the events are POSTed to.")
    events: list[stored.EventType] | None = Field(
        None, min_length=1, description="Event types to receive (default: all).")


def webhook_json(hook, secret: bool = False) -> dict:
    body = {"id": hook.id, "object": "webhook", "url": hook.url, "events": hook.events or list(stored.EVENT_TYPES),
            "created_at": iso(hook.created_at)}
    if secret:
        body["secret"] = hook.secret
    return body


def delivery_json(row) -> dict:
    last = row.log[-1] if row.log else {}
    return {"id": row.id, "object": "webhook_delivery", "event_id": row.event_id, "event_type": row.event_type,
            "status": row.status, "attempts": row.attempts, "created_at": iso(row.created_at),
            "next_attempt_at": iso(row.next_attempt_at) if row.status == "pending" else None,
            "status_code": last.get("status_code"), "error": last.get("error"), "log": row.log}


def _webhook_or_404(ctx: Context, webhook_id: str):
    hook = stored.get_webhook(ctx.store, webhook_id, ctx.owner)
    if hook is None:
        raise ApiError(404, "not_found", f"no webhook {webhook_id!r}", "webhook_id")
    return hook


@router.post("", status_code=201)
def create_webhook(submission: WebhookSubmission, ctx: Context = Depends(get_context)) -> dict:
    """Register an endpoint for your jobs' and sweeps' state changes. The answer holds the signing
    `secret`, shown this once: keep it to verify the `Rigl-Signature` header."""
    try:
        resolve(submission.url, ctx.settings)
    except AddressRefused as exc:
        raise ApiError(422, "invalid_url", str(exc), "url") from None
    try:
        hook = stored.create_webhook(ctx.store, ctx.principal, submission.url, submission.events,
                                     ctx.settings.max_webhooks_per_owner)
    except stored.TooManyWebhooks:
        raise ApiError(409, "too_many_webhooks", f"at most {ctx.settings.max_webhooks_per_owner} webhooks per "
                                                 "owner; delete one first", None) from None
    return webhook_json(hook, secret=True)


@router.get("")
def list_webhooks(ctx: Context = Depends(get_context)) -> dict:
    return {"object": "list", "data": [webhook_json(h) for h in stored.list_webhooks(ctx.store, ctx.owner)]}


@router.get("/{webhook_id}")
def get_webhook(webhook_id: str, ctx: Context = Depends(get_context)) -> dict:
    return webhook_json(_webhook_or_404(ctx, webhook_id))


@router.delete("/{webhook_id}")
def delete_webhook(webhook_id: str, ctx: Context = Depends(get_context)) -> dict:
    """The endpoint and its delivery log; nothing more is sent to it."""
    if not stored.delete_webhook(ctx.store, webhook_id, ctx.owner):
        raise ApiError(404, "not_found", f"no webhook {webhook_id!r}", "webhook_id")
    return {"id": webhook_id, "object": "webhook", "deleted": True}


@router.get("/{webhook_id}/deliveries")
def list_deliveries(webhook_id: str, limit: int = Query(50, ge=1, le=200), ctx: Context = Depends(get_context)
                    ) -> dict:
    """Newest first: each event sent (or to send) to the endpoint, with every attempt's status code, error
    and duration in `log`."""
    _webhook_or_404(ctx, webhook_id)
    return {"object": "list", "data": [delivery_json(d) for d in stored.deliveries(ctx.store, webhook_id, limit)]}


@router.post("/{webhook_id}/test", status_code=202)
def test_webhook(webhook_id: str, ctx: Context = Depends(get_context)) -> dict:
    """Queue a `webhook.test` event for this endpoint; it is sent (and retried) like any other."""
    _webhook_or_404(ctx, webhook_id)
    return delivery_json(stored.queue_test_event(ctx.store, webhook_id))
