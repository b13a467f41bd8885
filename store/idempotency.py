"""Idempotency-Key: a key names the one job or sweep its first request created, per owner.

The record is written in the transaction that creates the job or sweep, so two racing requests with one
key create one (the loser gets IdempotencyConflict and replays the winner's answer).
"""

from __future__ import annotations

from store.db import IdempotencyRecord
from store.job_state import StorePart


class IdempotencyConflict(Exception):
    """Another request with the same Idempotency-Key won the race."""


def check_unused(session, owner: str, idempotency: tuple[str, str] | None) -> None:
    """In the creating transaction, after the owner's lock: its twin committed while we waited? Replay it."""
    if idempotency is not None and session.get(IdempotencyRecord, (owner, idempotency[0])) is not None:
        raise IdempotencyConflict()


def remember(session, owner: str, idempotency: tuple[str, str] | None, created_id: str) -> None:
    """Record `idempotency` = (key, body hash) as naming `created_id` (a job's or a sweep's id)."""
    if idempotency is not None:
        session.add(IdempotencyRecord(owner=owner, key=idempotency[0], body_sha256=idempotency[1], job_id=created_id))


class Idempotency(StorePart):
    def lookup(self, owner: str, key: str) -> IdempotencyRecord | None:
        with self.sessions() as s:
            return s.get(IdempotencyRecord, (owner, key))
