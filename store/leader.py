"""Exactly one holder of a named role (the reaper) across every API replica and worker of a database.

A lock that dies with its holder, so a crashed leader never blocks the others and no lease needs to
expire: PostgreSQL's session advisory lock, held on a connection of its own (the server drops it
when that connection ends, whichever way the process dies), and for SQLite, whose users all share
one machine, an exclusive `flock` on a file beside the database (the kernel drops it when the
process dies). Whoever does not hold it tries again on its next round; whoever holds it checks on
every round that it still does (a PostgreSQL restart ends the session and, with it, the lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

log = logging.getLogger("rigl.leader")

_MEMORY_LOCKS: dict[str, threading.Lock] = {}  # sqlite :memory: lives in one process
_LOCKS: "weakref.WeakSet[LeaderLock]" = weakref.WeakSet()
_INHERITED: list = []  # a forked child's copies of held connections: kept, never closed (see _forget_in_child)


def _forget_in_child() -> None:
    """A forked child (a Celery pool process) must not hold or end its parent's lock: it closes its copy
    of the lock file's descriptor (the parent's copy keeps the flock; LOCK_UN would drop it for both)
    and keeps, without ever closing, its copy of the PostgreSQL session (closing would end it for the
    parent too)."""
    for lock in list(_LOCKS):
        if lock._file is not None:
            lock._file.close()
            lock._file = None
        if lock._connection is not None:
            _INHERITED.append(lock._connection)
            lock._connection = None
        lock._memory = None


os.register_at_fork(after_in_child=_forget_in_child)


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock (the same in every process and version)."""
    return int.from_bytes(hashlib.sha256(f"rigl:{name}".encode()).digest()[:8], "big", signed=True)


class LeaderLock:
    """`held()`: True while this process holds `name` for `database_url` (taking it when it is free)."""

    def __init__(self, database_url: str, name: str):
        self.url, self.name = make_url(database_url), name
        self._connection = None  # PostgreSQL: the session that holds the advisory lock
        self._file = None  # SQLite: the open, flock'ed lock file
        self._memory = None  # SQLite in memory: a process-wide lock
        self._engine = None
        _LOCKS.add(self)

    # ----------------------------------------------------------------- public
    def held(self) -> bool:
        try:
            if self.url.get_backend_name() == "postgresql":
                return self._held_postgres()
            if self.url.get_backend_name() == "sqlite":
                return self._held_sqlite()
        except Exception as exc:  # noqa: BLE001 - a database blip means "not the leader this round"
            log.warning("%s lock: %s; not acting this round", self.name, exc)
            self.release()
            return False
        return True  # another database: no lock primitive here; every holder acts (the sweeps are idempotent)

    def release(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()  # ends the session: the server drops the advisory lock
            except Exception:  # noqa: BLE001 - it is already gone
                pass
            self._connection = None
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None
        if self._memory is not None:
            self._memory.release()
            self._memory = None

    # ------------------------------------------------------------- PostgreSQL
    def _held_postgres(self) -> bool:
        if self._connection is not None:
            self._connection.execute(text("SELECT 1"))  # raises when the session (and the lock) is gone
            return True
        if self._engine is None:
            self._engine = create_engine(self.url, poolclass=NullPool)
        connection = self._engine.connect()
        taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": lock_key(self.name)}).scalar()
        connection.commit()
        if not taken:
            connection.close()
            return False
        self._connection = connection
        log.info("this process now runs the %s", self.name)
        return True

    # ----------------------------------------------------------------- SQLite
    def _held_sqlite(self) -> bool:
        database = self.url.database
        if not database or database == ":memory:":
            if self._memory is None:
                lock = _MEMORY_LOCKS.setdefault(self.name, threading.Lock())
                if not lock.acquire(blocking=False):
                    return False
                self._memory = lock
            return True
        if self._file is not None:
            return True
        handle = open(Path(database).with_name(Path(database).name + f".{self.name}.lock"), "a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._file = handle
        log.info("this process now runs the %s", self.name)
        return True
