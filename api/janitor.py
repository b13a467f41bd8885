"""The API's cleanup thread: keeps storage bounded without anyone having to ask.

Each pass (store/deletion.py `clean_up`) purges jobs whose deletion was asked for while they ran, once
their worker has stopped them; removes the resume checkpoint of every finished job (it can never be
resumed); and, with `retention_days`, deletes finished jobs older than that with their artifacts.
"""

from __future__ import annotations

import logging

from store.artifacts import Artifacts
from store.background import BackgroundLoop
from store.deletion import clean_up
from store.jobs import JobStore

log = logging.getLogger("rigl.janitor")


class Janitor(BackgroundLoop):
    idle = dict  # a failed pass did nothing

    def __init__(self, store: JobStore, artifacts: Artifacts, interval: float, retention_days: float | None):
        super().__init__("rigl-janitor", interval, log)
        self.store, self.artifacts, self.retention_days = store, artifacts, retention_days

    def work(self) -> dict:
        """One cleanup pass (`run_once`); what it did, by kind."""
        done = clean_up(self.store, self.artifacts, self.retention_days)
        if any(done.values()):
            log.info("cleanup: %s", {k: len(v) for k, v in done.items()})
        return done
