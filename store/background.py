"""One background thread that does one pass of some work every `interval` seconds until stopped.

The reaper (store/reaper.py) and the API's janitor (api/janitor.py) are such loops; here once: the
start, the stop, the interval, and the rule that a failing pass (a database hiccup) is logged and never
kills the thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any


class BackgroundLoop(threading.Thread):
    """Subclasses give `work()` (one pass) and `idle` (what a failed pass returns)."""

    idle: Any = None

    def __init__(self, name: str, interval: float, log: logging.Logger):
        super().__init__(name=name, daemon=True)
        self.interval, self.log = interval, log
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.run_once()

    def run_once(self):
        """One pass now; its result, or `idle` when it raised (logged)."""
        try:
            return self.work()
        except Exception:  # noqa: BLE001 - a database hiccup must not kill the thread
            self.log.exception("%s: a pass failed", self.name)
            return self.idle() if callable(self.idle) else self.idle

    def work(self):
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
