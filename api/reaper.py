"""The reaper: finds jobs whose worker died (stale heartbeat), requeues and re-enqueues them.

A killed worker never acks its message, and Redis would only redeliver it after the visibility
timeout (days), so the database lease is what brings such a job back within a minute. The attempt
cap in `JobStore.claim` ends a job that keeps killing its worker.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from store.jobs import JobStore

log = logging.getLogger("rigl.reaper")


class Reaper(threading.Thread):
    def __init__(self, store: JobStore, enqueue: Callable[[str], None], lease_seconds: float, interval: float):
        super().__init__(name="rigl-reaper", daemon=True)
        self.store, self.enqueue = store, enqueue
        self.lease_seconds, self.interval = lease_seconds, interval
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sweep()

    def sweep(self) -> list[str]:
        try:
            requeued = self.store.requeue_stale(self.lease_seconds)
            for job_id in requeued:
                log.warning("job %s lost its worker; requeued", job_id)
                self.enqueue(job_id)
            return requeued
        except Exception:  # noqa: BLE001 - a database hiccup must not kill the thread
            log.exception("reaper sweep failed")
            return []

    def stop(self) -> None:
        self.stopping.set()
