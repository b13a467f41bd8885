"""Send a job's message to the broker without ever losing the job when the broker is down.

The job row is written first and is the truth. If the message can't be sent (Redis restarting, a
network blip), the job stays queued, marked `broker_unavailable` where users can see it, and the
API's reaper sends it once the broker answers. A message is a slot, not a ticket: the worker that
receives it starts the fairest claimable job (Claims.claim), so every job sends exactly one and
messages and claimable jobs balance. A duplicate message is harmless: claiming is a compare-and-set,
so a delivery that finds nothing to claim exits.
"""

from __future__ import annotations

import logging
from typing import Callable

from store.jobs import JobStore

log = logging.getLogger("rigl.dispatch")


def dispatch(store: JobStore, enqueue: Callable[[str], None], job_id: str) -> bool:
    """True when the message went out; False when the job was left for the reaper to send."""
    try:
        enqueue(job_id)
    except Exception as exc:  # noqa: BLE001 - kombu raises several kinds; all mean "not sent"
        log.warning("job %s: broker unavailable (%s); left queued for the reaper", job_id, exc,
                    extra={"job_id": job_id})
        store.mark_undispatched(job_id, f"queued; the broker was unreachable ({type(exc).__name__}), "
                                        "the job will be sent to a worker when it is back")
        return False
    return True


def redispatch(store: JobStore, enqueue: Callable[[str], None]) -> list[str]:
    """The reaper's retry: send the jobs left behind, oldest first; stop at the first failure."""
    sent = []
    for job_id in store.undispatched_jobs():
        try:
            enqueue(job_id)
        except Exception:  # noqa: BLE001 - still down: the reaper's next pass tries again
            break
        store.mark_dispatched(job_id)
        sent.append(job_id)
    return sent
