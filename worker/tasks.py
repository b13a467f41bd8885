"""The one task: train a job by id. The body delegates to worker.runner."""

from __future__ import annotations

import rigl_core.trainer  # noqa: F401 - preload torch in the parent so each fresh child starts fast
from celery.signals import worker_shutting_down

from worker.app import app


@app.task(name="rigl.train", acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> str:
    from store.settings import get_settings
    from worker.runner import run_job

    outcome = run_job(job_id, get_settings())
    if outcome == "requeued":  # preempted by a shutdown: checkpointed; send it to the next worker
        train.apply_async(args=[job_id], queue=get_settings().queue)
    return outcome


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
