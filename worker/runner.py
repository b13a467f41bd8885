"""Run one job from the store: claim it, train with callbacks that stream into the store, finish it.

Celery-free, so it can be tested and reused; the Celery task is a thin wrapper around `run_job`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback

from rigl_core.export import save_dense, save_packed
from rigl_core.run import DENSE_EXPORT, PACKED_EXPORT, REPORT, write_json
from rigl_core.spec import JobSpec
from rigl_core.trainer import Callback, Trainer
from store.artifacts import Artifacts, sha256_file
from store.jobs import JobStore
from store.settings import Settings

log = logging.getLogger("rigl.worker")
RESUME_FILE = "resume.pt"


class StoreCallback(Callback):
    """Streams metrics/mask updates into the store (throttled), checkpoints, heartbeats, checks cancel."""

    def __init__(self, store: JobStore, artifacts: Artifacts, job_id: str, token: str, settings: Settings):
        self.store, self.artifacts, self.job_id, self.token = store, artifacts, job_id, token
        self.settings = settings
        self.pending: list[dict] = []
        self.latest: dict = {}
        self.last_poll = 0.0
        self.last_checkpoint = time.monotonic()
        self.cancel = False
        self.lost_lease = False
        self.shutdown = False

    def flush(self, step: int) -> None:
        if self.pending:
            self.store.add_events(self.job_id, self.pending)
            self.pending = []
        state = self.store.heartbeat(self.job_id, self.token, step, self.latest or None)
        self.cancel = self.cancel or state["cancel"]
        self.shutdown = self.shutdown or state["preempt"]
        self.lost_lease = not state["lease"]
        self.last_poll = time.monotonic()

    def on_step(self, trainer, metrics):
        self.latest = {**self.latest, "loss": metrics["loss"], "lr": metrics["lr"]}
        if trainer.step % self.settings.event_every_steps == 0:
            self.pending.append({"type": "metrics", "message": f"step {trainer.step}", "data": metrics})

    def on_eval(self, trainer, metrics):
        self.latest = {**self.latest, **{k: v for k, v in metrics.items() if k.startswith("val_")}}
        self.pending.append({"type": "eval", "message": f"epoch {metrics['epoch']}: val_accuracy "
                                                          f"{metrics['val_accuracy']:.4f}", "data": metrics})

    def on_mask_update(self, trainer, update):
        self.pending.append({"type": "mask_update", "message": f"mask update at step {update.step}",
                             "data": update.to_dict()})

    def should_stop(self, trainer) -> bool:
        if self.settings.fault_kill_at_step is not None and trainer.step == self.settings.fault_kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the poison-job test
        if (trainer.step % self.settings.checkpoint_every_steps == 0 and trainer.step < trainer.total_steps
                and time.monotonic() - self.last_checkpoint >= self.settings.checkpoint_min_seconds):
            save_resume_checkpoint(trainer, self.store, self.artifacts, self.job_id)
            self.last_checkpoint = time.monotonic()
        if time.monotonic() - self.last_poll >= self.settings.cancel_poll_seconds:
            self.flush(trainer.step)
        return self.cancel or self.lost_lease or self.shutdown


def save_resume_checkpoint(trainer: Trainer, store: JobStore, artifacts: Artifacts, job_id: str) -> None:
    artifacts.job_dir(job_id)
    path = trainer.save_checkpoint(artifacts.job_file(job_id, RESUME_FILE))
    store.add_checkpoint(job_id, "resume", trainer.step, RESUME_FILE, sha256_file(path), path.stat().st_size,
                         metrics=trainer.eval_history[-1] if trainer.eval_history else None)


def summary(report: dict) -> dict:
    totals = report["totals"]
    return {
        "sparsity": totals["sparsity"],
        "overall_sparsity": totals["overall_sparsity"],
        "inference_flops_ratio": totals["inference_flops_ratio"],
        "training_flops_ratio": totals["training_flops_ratio"],
        "final_metrics": report["final_metrics"],
        "train_seconds": report["train_seconds"],
        "steps": report["steps"],
        "leak_check_ok": report["leak_check"]["ok"],
    }


def run_job(job_id: str, settings: Settings, store: JobStore | None = None) -> str:
    """Returns what happened: succeeded, failed, cancelled, requeued or skipped (not ours to run)."""
    store = store or JobStore(settings.database_url)
    artifacts = Artifacts(settings.artifact_dir)
    job, token = store.claim(job_id, settings.max_attempts, settings.lease_seconds,
                             worker=f"{socket.gethostname()}:{os.getpid()}")
    if job is None:
        log.info("job %s not run: %s", job_id, token)
        return "skipped"
    callback = StoreCallback(store, artifacts, job_id, token, settings)
    try:
        spec = JobSpec.model_validate(job.resolved_spec)
        trainer = Trainer(spec, callbacks=[callback])
        resume = store.latest_checkpoint(job_id, "resume")
        if resume is not None:
            trainer.load_checkpoint(artifacts.job_file(job_id, resume.filename))
            store.add_events(job_id, [{"type": "message", "message": f"resumed from step {trainer.step}",
                                       "data": {"resumed_from_step": trainer.step}}])
        report = trainer.fit()
        callback.flush(trainer.step)
        if callback.lost_lease:
            log.warning("job %s: lease lost, stopping without writing", job_id)
            return "skipped"
        if trainer.stopped_early:
            save_resume_checkpoint(trainer, store, artifacts, job_id)
            if callback.shutdown and not callback.cancel:
                store.requeue(job_id, token, f"worker shutting down at step {trainer.step}; will resume")
                return "requeued"
            store.finish(job_id, token, "cancelled", f"cancelled at step {trainer.step}")
            return "cancelled"
        job_dir = artifacts.job_dir(job_id)
        report["spec"] = job.spec
        write_json(job_dir / REPORT, report)
        for kind, name, save in (("dense", DENSE_EXPORT, lambda p: save_dense(trainer.model, p)),
                                 ("packed", PACKED_EXPORT, lambda p: save_packed(trainer.model,
                                                                                 trainer.sparsifier.masks, p))):
            path = job_dir / name
            save(path)
            store.add_checkpoint(job_id, kind, trainer.step, name, sha256_file(path), path.stat().st_size,
                                 metrics=report["final_metrics"])
        store.finish(job_id, token, "succeeded", "succeeded", result=summary(report))
        return "succeeded"
    except Exception as exc:  # noqa: BLE001 - any failure ends the job with a readable error
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        code = "invalid_job" if isinstance(exc, ValueError) else "training_error"
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        store.finish(job_id, token, "failed", message, error_code=code)
        return "failed"
