"""Heartbeat: a thread that keeps a claimed job's lease fresh, whatever the training loop is doing.

Before it existed the lease was renewed between training steps only, so a slow start (importing,
loading a dataset, first CUDA context) or a long evaluation could outlast the lease: the reaper
requeued a healthy job and the worker threw its work away. The thread writes progress and reads
the cancel / preempt flags; the training loop only looks at what it last saw. Its writes stamp
the lease with the database's clock (Leases.heartbeat), so a worker whose clock is off is judged
fairly; while the database is unreachable it keeps trying every interval.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from store.jobs import JobStore

log = logging.getLogger("rigl.worker")


class Heartbeat(threading.Thread):
    def __init__(self, store: JobStore, job_id: str, token: str, interval: float,
                 progress: Callable[[], tuple[int | None, dict | None]]):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.token, self.interval = store, job_id, token, interval
        self.progress = progress  # () -> (step or None before the first step, latest metrics or None)
        self.cancel = self.preempt = self.lost_lease = False
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # one beat at a time: the thread's and a final beat_now()

    def run(self) -> None:
        from service_common.log_context import job_id_var

        job_id_var.set(self.job_id)  # a thread starts with empty context variables: its lines name the job too
        failures = 0
        while not self.stopping.wait(self.interval):
            try:
                self.beat_now()
            except Exception as error:  # noqa: BLE001 - a database outage: keep trying every interval
                failures += 1
                if failures == 1 or failures % 50 == 0:
                    log.warning("job %s: heartbeat failed %d times (%s); retrying", self.job_id, failures,
                                type(error).__name__)
                continue
            if failures:
                log.info("job %s: heartbeat back after %d failures", self.job_id, failures)
                failures = 0

    def beat_now(self) -> None:
        with self.lock:
            step, metrics = self.progress()
            state = self.store.leases.heartbeat(self.job_id, self.token, step, metrics)
            self.cancel = self.cancel or state["cancel"]
            self.preempt = self.preempt or state["preempt"]
            self.lost_lease = not state["lease"]

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=self.interval + 10)
