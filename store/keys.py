"""API keys: `rigl_<key id>_<secret>`; stored as the secret's SHA-256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from store.db import ApiKey, utcnow
from store.jobs import JobStore

KEY_PATTERN = re.compile(r"^rigl_(key_[0-9a-f]{20})_([A-Za-z0-9_-]{20,100})$")


@dataclass
class Principal:
    owner: str
    admin: bool
    key_id: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: JobStore, owner: str, name: str = "", admin: bool = False) -> tuple[ApiKey, str]:
    """Returns the record and the full key, which is never stored and cannot be shown again."""
    secret = secrets.token_urlsafe(32)
    with store.sessions.begin() as s:
        row = ApiKey(owner=owner, name=name, admin=admin, secret_sha256=_digest(secret))
        s.add(row)
        s.flush()
        key = f"rigl_{row.id}_{secret}"
    return row, key


def list_keys(store: JobStore) -> list[ApiKey]:
    with store.sessions() as s:
        return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(store: JobStore, key_id: str) -> bool:
    with store.sessions.begin() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
    return True


def authenticate(store: JobStore, key: str) -> Principal | None:
    match = KEY_PATTERN.match(key or "")
    if not match:
        return None
    key_id, secret = match.groups()
    with store.sessions() as s:
        row = s.get(ApiKey, key_id)
    expected = row.secret_sha256 if row is not None else "0" * 64
    ok = hmac.compare_digest(_digest(secret), expected)
    if row is None or not ok or row.revoked_at is not None:
        return None
    return Principal(owner=row.owner, admin=row.admin, key_id=row.id)
