"""A job's MLflow run, from the worker's side: whether and where (the JobSpec's `tracking.mlflow` over the
deployment's `mlflow_tracking_uri`), the run's tags (method, sparsity, owner, job id, sweep), and which
of the job's published files go to it (rigl_core's run_files). The logging itself is rigl_core/integrations/mlflow.py; this
module only wires it to a job. MLflow is never the source of truth and never fails a job: a missing
extra or a server that is down is a warning event on the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rigl_core.integrations.mlflow import MlflowCallback, asked_for, resolve_target
from rigl_core.optional import MissingExtra
from store.db import Job
from store.settings import Settings

log = logging.getLogger("rigl.worker")
WARNING_CODE = "tracking_unavailable"


def job_tracker(job: Job, settings: Settings, warn: Callable[[str], None]) -> MlflowCallback | None:
    """The job's MLflow callback, or None when the job is not tracked (or can't be: `warn` says why)."""
    spec = job.resolved_spec or {}
    target = resolve_target(spec.get("tracking"), settings.mlflow_tracking_uri, settings.mlflow_experiment,
                            run_name=job.name or job.id)
    if target is None:
        if asked_for(spec.get("tracking")):
            warn("tracking.mlflow: no tracking URI (neither the job's tracking.mlflow.uri nor the service's "
                 "RIGL_MLFLOW_TRACKING_URI); this job is not logged to MLflow")
        return None
    sparsity = spec.get("sparsity") or {}
    tags = {"rigl.method": sparsity.get("method"), "rigl.sparsity": sparsity.get("sparsity"),
            "rigl.owner": job.owner, "rigl.model": (spec.get("model") or {}).get("name"),
            "rigl.dataset": (spec.get("dataset") or {}).get("name")}
    if getattr(job, "sweep_id", None):
        tags["rigl.sweep_id"] = job.sweep_id
    params = {key: value for key, value in spec.items() if key != "tracking"}
    try:
        return MlflowCallback(target, params=params, tags={k: v for k, v in tags.items() if v is not None},
                              job_id=job.id, warn=warn, flush_seconds=settings.mlflow_flush_seconds)
    except MissingExtra as error:
        warn(f"not logged to MLflow: {error}")
        return None
