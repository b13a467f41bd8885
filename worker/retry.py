"""Retry with backoff for a worker's database writes that fail for a transient reason.

A database restart, a failover or a network blip used to kill the training process: the first
failed write raised out of the training loop and the job ended `failed` (or, when the failure write
failed too, stuck `running` until the reaper burned an attempt). Writes that must happen (claim,
checkpoint rows, finish, requeue) retry here with exponential backoff for `budget` seconds; the
heartbeat thread and the event flush retry on their own schedule instead (worker/heartbeat.py,
worker/runner.py). Errors that would fail the same way again (bad data, a lost lease) are raised
at once.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from sqlalchemy import exc as sa_exc

log = logging.getLogger("rigl.worker")
T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """A connection-level failure (refused, reset, timed out, server restarting), not a bad statement."""
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
                          sa_exc.TimeoutError)):
        return True
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, (ConnectionError, TimeoutError))


def retry_transient(call: Callable[[], T], budget: float, what: str, first_delay: float = 0.2,
                    max_delay: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, again after a transient failure, until it succeeds or `budget` seconds have passed
    (then the last error is raised)."""
    deadline = time.monotonic() + budget
    delay = first_delay
    failures = 0
    while True:
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - filtered just below
            if not is_transient(error) or time.monotonic() + delay > deadline:
                raise
            failures += 1
            if failures == 1 or failures % 10 == 0:
                log.warning("%s: database unavailable (%s); retrying for up to %.0f s", what,
                            type(error).__name__, max(0.0, deadline - time.monotonic()))
            sleep(delay)
            delay = min(max_delay, delay * 2)
            continue
        if failures:
            log.info("%s: succeeded after %d retries", what, failures)
        return result
