"""Webhooks: owners' endpoints, and the outbox of job and sweep state changes they receive.

The outbox: every job status change in the store writes a `status` event in the transaction that
changes the job (store/job_state.py and the parts that follow its rule). A `before_flush` hook on the
store's sessions (`install`) sees those events and, in the same flush, adds one WebhookDelivery row per
endpoint of the job's owner that wants the event: a change that commits has its deliveries, a change
that rolls back has none, and a restart loses nothing (the rows wait in the database). One indexed
query per status event finds the endpoints; an owner without any costs just that query.

A sweep reports `sweep.finished` when the last of its children ends (the sweep row is locked first, so
two children ending together report it once) and `sweep.cancelled` when it is cancelled (store/sweeps.py).

Sending is the API's webhook sender (api/webhook_sender.py): `due` hands it deliveries one at a time,
each taken with a compare-and-set on its due time (two API replicas never send one attempt twice), and
`record` writes each attempt's outcome and the next due time (exponential backoff).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from types import SimpleNamespace
from typing import Literal

from sqlalchemy import bindparam, delete, event, func, insert, select, update

from store.artifacts import issued_id
from store.db import Event, Job, Sweep, Webhook, WebhookDelivery, db_now, new_id, utcnow
from store.job_state import TERMINAL

JOB_EVENTS = tuple(f"job.{status}" for status in ("queued", "running", "succeeded", "failed", "cancelled",
                                                    "cancelling", "requeued"))
SWEEP_EVENTS = ("sweep.finished", "sweep.cancelled")
EVENT_TYPES = JOB_EVENTS + SWEEP_EVENTS
EventType = Literal[EVENT_TYPES]  # what an endpoint may subscribe to
TEST_EVENT = "webhook.test"
MAX_LOG = 20  # attempts kept in a delivery's log
KEEP_DAYS = 30  # finished deliveries older than this are pruned by the sender
CLAIM_SECONDS = 60  # a taken delivery is due again after this if its sender died mid-attempt


class TooManyWebhooks(Exception):
    pass


# ---------------------------------------------------------------------------------------------- outbox
def install(sessions) -> None:
    """Hook the outbox into a sessionmaker (JobStore does it for every store, API and worker alike)."""
    event.listen(sessions, "before_flush", _on_flush)


def _on_flush(session, _context, _instances) -> None:
    status_events = [obj for obj in session.new if isinstance(obj, Event) and obj.type == "status"]
    if not status_events:
        return
    with session.no_autoflush:
        for status_event in status_events:
            status = (status_event.data or {}).get("status")
            if status:
                _job_changed(session, status_event.job_id, status, status_event.message)


_JOBS, _HOOKS = Job.__table__.c, Webhook.__table__.c
# built once (Core, a bound parameter): this runs at every status change, mostly to find nothing
_HOOKS_OF_JOB = (select(_JOBS.owner, _JOBS.name, _JOBS.sweep_id, _HOOKS.id, _HOOKS.events)
                 .join_from(Job.__table__, Webhook.__table__, _HOOKS.owner == _JOBS.owner)
                 .where(_JOBS.id == bindparam("job_id")))


def _job_changed(session, job_id: str, status: str, message: str | None) -> None:
    rows = session.execute(_HOOKS_OF_JOB, {"job_id": job_id}).all()
    if not rows:
        return
    owner, name, sweep_id = rows[0][:3]
    hooks = [(hook_id, events) for *_job, hook_id, events in rows]
    enqueue(session, hooks, f"job.{status}", {"object": "job", "id": job_id, "status": status, "name": name,
                                              "sweep_id": sweep_id, "message": message})
    if sweep_id is not None and status in TERMINAL:
        _maybe_sweep_finished(session, sweep_id, job_id, hooks)


def _maybe_sweep_finished(session, sweep_id: str, job_id: str, hooks) -> None:
    sweep = session.scalars(select(Sweep).where(Sweep.id == sweep_id).with_for_update()).first()
    if sweep is None or sweep.status != "active" or sweep.held_count:
        return
    running = session.scalar(select(func.count()).select_from(Job).where(
        Job.sweep_id == sweep_id, Job.id != job_id, Job.status.not_in(TERMINAL)))
    if not running:
        enqueue(session, hooks, "sweep.finished", {"object": "sweep", "id": sweep_id, "status": "finished",
                                                   "name": sweep.name})


def sweep_cancelled(session, sweep: Sweep) -> None:
    """In the transaction that cancels `sweep`."""
    hooks = session.execute(select(Webhook.id, Webhook.events).where(Webhook.owner == sweep.owner)).all()
    enqueue(session, hooks, "sweep.cancelled", {"object": "sweep", "id": sweep.id, "status": "cancelled",
                                                "name": sweep.name})


def enqueue(session, hooks, event_type: str, data: dict) -> list[SimpleNamespace]:
    """One delivery per endpoint in `hooks` ((id, wanted event types or None)) that wants `event_type`, in
    the session's transaction (a Core insert: no ORM objects for the flush to track, half the cost)."""
    wanted = [hook_id for hook_id, events in hooks if not events or event_type in events]
    if not wanted:
        return []
    now = utcnow()
    event_id = new_id("evt")
    payload = json.dumps({"id": event_id, "type": event_type, "created_at": now.isoformat(), "data": data},
                         separators=(",", ":"))
    rows = [{"id": new_id("whd"), "webhook_id": hook_id, "event_id": event_id, "event_type": event_type,
             "payload": payload, "status": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now,
             "log": []} for hook_id in wanted]
    session.execute(insert(WebhookDelivery), rows)
    return [SimpleNamespace(**row) for row in rows]


# ---------------------------------------------------------------------------------------------- endpoints
def create_webhook(store, owner: str, url: str, events: list[str] | None, max_per_owner: int) -> Webhook:
    """The secret is made here and returned once, on this object."""
    with store.sessions.begin() as s:
        store.lock_owners(s, [owner])
        count = s.scalar(select(func.count()).select_from(Webhook).where(Webhook.owner == owner)) or 0
        if count >= max_per_owner:
            raise TooManyWebhooks(max_per_owner)
        hook = Webhook(owner=owner, url=url, events=events or None, secret="whsec_" + secrets.token_hex(24),
                       created_at=utcnow())
        s.add(hook)
    return hook


def list_webhooks(store, owner: str | None) -> list[Webhook]:
    with store.sessions() as s:
        query = select(Webhook).order_by(Webhook.created_at.desc(), Webhook.id)
        if owner is not None:
            query = query.where(Webhook.owner == owner)
        return list(s.scalars(query))


def get_webhook(store, webhook_id: str, owner: str | None) -> Webhook | None:
    """Someone else's endpoint is as good as missing (as jobs are)."""
    if not issued_id(webhook_id):
        return None
    with store.sessions() as s:
        query = select(Webhook).where(Webhook.id == webhook_id)
        if owner is not None:
            query = query.where(Webhook.owner == owner)
        return s.scalars(query).first()


def delete_webhook(store, webhook_id: str, owner: str | None) -> bool:
    """The endpoint and its deliveries (sent or not: nothing more goes to it)."""
    if get_webhook(store, webhook_id, owner) is None:
        return False
    with store.sessions.begin() as s:
        s.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id))
        return s.execute(delete(Webhook).where(Webhook.id == webhook_id)).rowcount == 1


def deliveries(store, webhook_id: str, limit: int) -> list[WebhookDelivery]:
    with store.sessions() as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                              .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)))


def queue_test_event(store, webhook_id: str) -> WebhookDelivery:
    """A `webhook.test` event for this endpoint alone, sent like any other."""
    with store.sessions.begin() as s:
        return enqueue(s, [(webhook_id, None)], TEST_EVENT, {"object": "webhook", "id": webhook_id})[0]


# ---------------------------------------------------------------------------------------------- sending
def due(store, limit: int = 20) -> list[tuple[WebhookDelivery, Webhook]]:
    """Deliveries due now, each taken for CLAIM_SECONDS (a compare-and-set on its due time, so another
    replica's sender skips it); with their endpoint."""
    taken = []
    with store.sessions() as s:
        now = db_now(s)
        candidates = s.execute(select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
                               .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                               .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    for delivery_id, due_at in candidates:
        with store.sessions.begin() as s:
            until = db_now(s) + dt.timedelta(seconds=CLAIM_SECONDS)
            claimed = s.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at == due_at).values(next_attempt_at=until)).rowcount == 1
            if claimed:
                delivery = s.get(WebhookDelivery, delivery_id)
                hook = s.get(Webhook, delivery.webhook_id)
                if hook is None:  # written as its endpoint was being deleted: nobody to send it to
                    s.delete(delivery)
                else:
                    taken.append((delivery, hook))
    return taken


def prune(store, days: float = KEEP_DAYS) -> int:
    """Delete finished deliveries (succeeded or failed) older than `days`: the log stays bounded."""
    with store.sessions.begin() as s:
        cutoff = db_now(s) - dt.timedelta(days=days)
        return s.execute(delete(WebhookDelivery).where(WebhookDelivery.status != "pending",
                                                       WebhookDelivery.created_at < cutoff)).rowcount


def record(store, delivery_id: str, attempt: dict, succeeded: bool, max_attempts: int, retry_base: float) -> str:
    """Write one attempt (`attempt`: status_code, error, duration_ms) and what comes next; the new status.
    Waits between tries: retry_base, then 4 times longer each time."""
    with store.sessions.begin() as s:
        delivery = s.get(WebhookDelivery, delivery_id)
        if delivery is None:  # its endpoint was deleted meanwhile
            return "deleted"
        now = db_now(s)
        delivery.attempts += 1
        delivery.log = [*delivery.log, {"attempt": delivery.attempts, "at": now.isoformat(), **attempt}][-MAX_LOG:]
        if succeeded:
            delivery.status = "succeeded"
        elif delivery.attempts >= max_attempts:
            delivery.status = "failed"
        else:
            delivery.next_attempt_at = now + dt.timedelta(seconds=retry_base * 4 ** (delivery.attempts - 1))
        return delivery.status
