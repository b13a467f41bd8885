"""The one task: train a job by id. The body delegates to worker.runner."""

from __future__ import annotations

import signal
import threading

import rigl_core.trainer  # noqa: F401 - preload torch in the parent so each fresh child starts fast
from celery.signals import worker_shutting_down

from worker.app import app


@app.task(name="rigl.train", acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> str:
    """SIGTERM to this pool process (Celery cancels running tasks when it loses the broker; an
    operator's `kill`) asks the job to checkpoint and requeue at the next step. Billiard's default
    handler raised SystemExit wherever the process was, even inside a database call, and a job
    interrupted there was marked failed."""
    from store.dispatch import dispatch
    from store.jobs import JobStore
    from store.settings import get_settings
    from worker.runner import run_job

    stop_requested = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())
    try:
        settings = get_settings()
        store = JobStore(settings.database_url)
        outcome = run_job(job_id, settings, store, stop_requested=stop_requested)
        if outcome == "requeued":  # checkpointed; send it to the next worker (or leave it to the reaper)
            dispatch(store, lambda job: train.apply_async(args=[job], queue=settings.queue), job_id)
        return outcome
    finally:
        signal.signal(signal.SIGTERM, previous)


@worker_shutting_down.connect
def _preempt_running_jobs(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    """SIGTERM (warm shutdown): ask the running job to checkpoint and requeue itself instead of the
    worker waiting hours for it to finish; the next worker resumes it from that checkpoint."""
    from celery.worker import state

    from store.jobs import JobStore
    from store.settings import get_settings

    job_ids = [request.args[0] for request in list(state.active_requests) if request.args]
    if job_ids:
        JobStore(get_settings().database_url).request_preempt(job_ids)
