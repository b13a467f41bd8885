"""The server's own key for keyed hashes (HMAC-SHA256) of names it must not show: owner labels on /metrics.

Why: an unsalted sha256 of an owner name is reversed by hashing candidate names (e-mail addresses are easy to
guess), so the label is keyed. `RIGL_METRICS_LABEL_KEY` (or `RIGL_METRICS_LABEL_KEY_FILE`, like the other
secrets) sets it; unset, a random key is made once and kept in `<data_dir>/secrets/metrics_label_key`
(0600), so labels stay stable across restarts and API replicas sharing the data volume agree on them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = Path("secrets") / "metrics_label_key"


def label_key(settings) -> bytes:
    """The configured key, else the persisted one in data_dir (made on first use, atomically)."""
    if settings.metrics_label_key:
        return settings.metrics_label_key.encode()
    path = Path(settings.data_dir).expanduser() / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # the first writer wins: replicas starting together keep one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def keyed_label(key: bytes, name: str, digits: int = 12) -> str:
    """`h:<digits hex>` of HMAC-SHA256(key, name)."""
    return "h:" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:digits]
