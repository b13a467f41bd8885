"""Run one job from the store: claim it, train with callbacks that stream into the store, finish it.

Celery-free, so it can be tested and reused; the Celery task is a thin wrapper around `run_job`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback

from rigl_core.export import save_dense, save_packed
from rigl_core.run import DENSE_EXPORT, PACKED_EXPORT, REPORT, write_json
from rigl_core.spec import JobSpec
from rigl_core.trainer import Callback, Trainer
from store.artifacts import Artifacts, sha256_file
from store.jobs import JobStore
from store.settings import Settings
from worker.heartbeat import Heartbeat

log = logging.getLogger("rigl.worker")
RESUME_FILE = "resume.pt"


class StoreCallback(Callback):
    """Streams metrics/mask updates into the store (batched), checkpoints, and stops the loop when the
    job is cancelled, preempted, lost or its process is asked to stop. The Heartbeat thread keeps the
    lease and reads the flags, so a slow start or a long evaluation can't lose the job."""

    def __init__(self, store: JobStore, artifacts: Artifacts, job_id: str, token: str, settings: Settings,
                 stop_requested: threading.Event | None = None):
        self.store, self.artifacts, self.job_id, self.token = store, artifacts, job_id, token
        self.settings = settings
        self.pending: list[dict] = []
        self.step: int | None = None  # None until training starts: the heartbeat keeps the stored step
        self.latest: dict = {}
        self.last_flush = time.monotonic()
        self.last_checkpoint = time.monotonic()
        self.stop_requested = stop_requested or threading.Event()
        self.heartbeat = Heartbeat(store, job_id, token, settings.cancel_poll_seconds,
                                   progress=lambda: (self.step, self.latest or None))

    @property
    def cancel(self) -> bool:
        return self.heartbeat.cancel

    @property
    def lost_lease(self) -> bool:
        return self.heartbeat.lost_lease

    @property
    def shutdown(self) -> bool:
        """The worker is shutting down (preempt flag) or this process got SIGTERM: checkpoint and requeue."""
        return self.heartbeat.preempt or self.stop_requested.is_set()

    def flush(self) -> None:
        if self.pending:
            self.store.add_events(self.job_id, self.pending)
            self.pending = []
        self.last_flush = time.monotonic()

    def sync(self, step: int) -> None:
        """Before the runner decides what happened: every event written, progress and flags fresh."""
        self.step = step
        self.flush()
        self.heartbeat.beat_now()

    def on_step(self, trainer, metrics):
        self.step = trainer.step
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
        if time.monotonic() - self.last_flush >= self.settings.cancel_poll_seconds:
            self.flush()
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


def run_job(job_id: str, settings: Settings, store: JobStore | None = None,
            stop_requested: threading.Event | None = None) -> str:
    """Returns what happened: succeeded, failed, cancelled, requeued or skipped (not ours to run).

    `stop_requested` (set from a SIGTERM handler) makes the job checkpoint and requeue at the next step.
    """
    store = store or JobStore(settings.database_url)
    artifacts = Artifacts(settings.artifact_dir)
    job, token = store.claim(job_id, settings.max_attempts, settings.lease_seconds,
                             worker=f"{socket.gethostname()}:{os.getpid()}")
    if job is None:
        log.info("job %s not run: %s", job_id, token)
        return "skipped"
    callback = StoreCallback(store, artifacts, job_id, token, settings, stop_requested)
    callback.heartbeat.start()
    try:
        spec = JobSpec.model_validate(job.resolved_spec)
        trainer = Trainer(spec, callbacks=[callback])
        resume = store.latest_checkpoint(job_id, "resume")
        if resume is not None:
            trainer.load_checkpoint(artifacts.job_file(job_id, resume.filename))
            callback.step = trainer.step
            store.add_events(job_id, [{"type": "message", "message": f"resumed from step {trainer.step}",
                                       "data": {"resumed_from_step": trainer.step}}])
        report = trainer.fit()
        callback.sync(trainer.step)
        if callback.lost_lease:
            log.warning("job %s: lease lost, stopping without writing", job_id)
            return "skipped"
        if trainer.stopped_early:
            save_resume_checkpoint(trainer, store, artifacts, job_id)
            if callback.shutdown and not callback.cancel:
                why = "worker process stopped (SIGTERM)" if callback.stop_requested.is_set() else \
                    "worker shutting down"
                store.requeue(job_id, token, f"{why} at step {trainer.step}; will resume")
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
    finally:
        callback.heartbeat.stop()
