"""The API's cleanup thread: keeps storage bounded without anyone having to ask.

Each pass (store/deletion.py `sweep`) purges jobs whose deletion was asked for while they ran, once
their worker has stopped them; removes the resume checkpoint of every finished job (it can never be
resumed); and, with `retention_days`, deletes finished jobs older than that with their artifacts.
"""

from __future__ import annotations

import logging
import threading

from store.artifacts import Artifacts
from store.deletion import sweep
from store.jobs import JobStore

log = logging.getLogger("rigl.janitor")


class Janitor(threading.Thread):
    def __init__(self, store: JobStore, artifacts: Artifacts, interval: float, retention_days: float | None):
        super().__init__(name="rigl-janitor", daemon=True)
        self.store, self.artifacts = store, artifacts
        self.interval, self.retention_days = interval, retention_days
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sweep()

    def sweep(self) -> dict:
        try:
            done = sweep(self.store, self.artifacts, self.retention_days)
        except Exception:  # noqa: BLE001 - a database hiccup must not kill the thread
            log.exception("cleanup sweep failed")
            return {}
        if any(done.values()):
            log.info("cleanup: %s", {k: len(v) for k, v in done.items()})
        return done

    def stop(self) -> None:
        self.stopping.set()
