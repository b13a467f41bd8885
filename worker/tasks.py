"""The one task: train a job by id. The body delegates to worker.runner."""

from __future__ import annotations

import rigl_core.trainer  # noqa: F401 - preload torch in the parent so each fresh child starts fast
from worker.app import app


@app.task(name="rigl.train", acks_late=True, reject_on_worker_lost=True)
def train(job_id: str) -> str:
    from store.settings import get_settings
    from worker.runner import run_job

    return run_job(job_id, get_settings())
