"""The reaper: finds jobs whose worker died (stale heartbeat), requeues and re-enqueues them.

A killed worker never acks its message, and Redis would only redeliver it after the visibility
timeout (days), so the database lease is what brings such a job back within a minute. Staleness is
judged by the database's clock, the one heartbeats are stamped with, so a worker whose clock is off
is neither reaped while alive nor kept alive when dead. A run found this way counts as a failed
attempt (a clean SIGTERM requeue does not), and the attempt cap in `Claims.claim` ends a job that
keeps killing its worker. It also sends the messages that could not be sent while the broker was
down (store/dispatch.py), releases sweep children held by the per-owner cap (store/sweeps.py)
once their owner's jobs have ended, and moves optuna sweeps on (store/search.py).

It runs in every API replica and every worker (`RIGL_REAPER`), so lost jobs come back even when no
API is up; a LeaderLock (store/leader.py) lets exactly one of them act at a time, and another takes
over within one interval when that one dies.
"""

from __future__ import annotations

import logging
from typing import Callable

from store.background import BackgroundLoop
from store.dispatch import dispatch, redispatch
from store.jobs import JobStore
from store.leader import LeaderLock

log = logging.getLogger("rigl.reaper")


class Reaper(BackgroundLoop):
    idle = list  # a failed pass requeued nothing

    def __init__(self, store: JobStore, enqueue: Callable[[str], None], lease_seconds: float, interval: float,
                 lock: LeaderLock | None = None, max_active: int | None = None):
        super().__init__("rigl-reaper", interval, log)
        self.store, self.enqueue = store, enqueue
        self.lease_seconds = lease_seconds
        self.lock = lock  # None: act on every pass (a test, or a single process that is the only one)
        self.max_active = max_active  # the per-owner active-job cap held sweep children wait for; None: settings'

    def work(self) -> list[str]:
        """One pass (`run_once`): requeue and re-send jobs whose worker died; re-send jobs whose message never
        reached the broker; release held sweep children. Does nothing (returns []) while another process holds
        the reaper's lock. Returns the requeued ids."""
        if self.lock is not None and not self.lock.held():
            return []
        requeued = self.store.leases.requeue_stale(self.lease_seconds)
        for job_id in requeued:
            log.warning("job %s lost its worker; requeued", job_id, extra={"job_id": job_id})
            dispatch(self.store, self.enqueue, job_id)
        for job_id in redispatch(self.store, self.enqueue):
            log.info("job %s sent to the broker, which is reachable again", job_id, extra={"job_id": job_id})
        self.release_sweep_children()
        self.advance_searches()
        return requeued

    def release_sweep_children(self) -> list[str]:
        from store.settings import get_settings
        from store.sweeps import release_held

        cap = self.max_active if self.max_active is not None else get_settings().max_active_jobs_per_owner
        return release_held(self.store, self.enqueue, cap)

    def advance_searches(self) -> None:
        """Optuna sweeps: report, prune, tell and ask (store/search.py); nothing without such a sweep."""
        from store.search import advance_searches
        from store.settings import get_settings

        cap = self.max_active if self.max_active is not None else get_settings().max_active_jobs_per_owner
        advance_searches(self.store, self.enqueue, self.store.engine.url.render_as_string(hide_password=False), cap)

    def stop(self) -> None:
        super().stop()
        if self.lock is not None:
            if self.is_alive():
                self.join(timeout=5)  # not mid-pass when the lock goes to the next holder
            self.lock.release()


def start_reaper(store: JobStore, enqueue: Callable[[str], None], database_url: str, lease_seconds: float,
                 interval: float, max_active: int | None = None) -> Reaper:
    """The reaper of an API replica or a worker: one thread, acting only while it holds the lock."""
    reaper = Reaper(store, enqueue, lease_seconds, interval, lock=LeaderLock(database_url, "reaper"),
                    max_active=max_active)
    reaper.start()
    return reaper
