"""Run one job from the store: claim it, train with callbacks that stream into the store, finish it.

Celery-free, so it can be tested and reused; the Celery task is a thin wrapper around `run_slot`.

Every write carries the run's lease token and is refused once the lease is lost (store/leases.py `fence`),
and every file the run publishes is written under a name of its own (attempt and step in the resume
checkpoint's name, `.a<attempt>.tmp` temp names for the exports), so a worker that lost its lease can
never overwrite its successor's files or rows. A database that is briefly unreachable is waited out
(worker/retry.py), never turned into a failed job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from rigl_core.export.pipeline import OutputFile, TrainedRun, write_outputs
from rigl_core.integrations.mlflow import run_files
from rigl_core.spec import JobSpec
from rigl_core.training.distributed import Gang
from rigl_core.training.trainer import Callback, NoSpaceError, Trainer, is_no_space
from service_common import tracing
from store.artifacts import DATASET_KEY, PROGRAM_KEY, WEIGHTS_KEY, Artifacts, MissingArtifact, sha256_file
from store.db import Job
from store.jobs import JobStore
from store.leases import LeaseLost
from store.object_store import is_store_outage
from store.scrub import scrub_paths
from store.settings import Settings
from store.spec_version import SPEC_VERSION, spec_body, version_of
from store.user_paths import check_job_paths, on_this_node
from worker.devices import owned_devices
from worker.heartbeat import Heartbeat
from worker.metrics import JobMeter, observed
from worker.retry import is_transient, retry_transient
from worker.tracking import WARNING_CODE, job_tracker

try:  # the Celery task's fallback when the cooperative time-limit check could not stop the run in time
    from celery.exceptions import SoftTimeLimitExceeded
except ImportError:  # pragma: no cover - celery is a dependency of the service
    class SoftTimeLimitExceeded(Exception):  # type: ignore[no-redef]
        pass

log = logging.getLogger("rigl.worker")
MAX_PENDING_EVENTS = 5000  # kept while the database is down; beyond it the oldest metrics events go


def resume_name(attempt: int, step: int) -> str:
    """Each resume checkpoint gets its own file: a stale holder and its successor never share one, and
    a published row never points at a file that is being overwritten."""
    return f"resume.a{attempt}.s{step}.pt"


class StoreCallback(Callback):
    """Streams metrics/mask updates into the store (batched), checkpoints, and stops the loop when the
    job is cancelled, preempted, lost, out of time or its process is asked to stop. The Heartbeat
    thread keeps the lease and reads the flags, so a slow start or a long evaluation can't lose the job."""

    def __init__(self, store: JobStore, artifacts: Artifacts, job: Job, token: str, settings: Settings,
                 stop_requested: threading.Event | None = None, deadline: float | None = None):
        self.store, self.artifacts, self.token, self.settings = store, artifacts, token, settings
        self.job_id, self.attempt = job.id, job.attempt
        self.pending: list[dict] = []
        self.step: int | None = None  # None until training starts: the heartbeat keeps the stored step
        self.latest: dict = {}
        self.last_flush = time.monotonic()
        self.flush_retry_at = 0.0
        self.flush_delay = 0.0
        self.last_checkpoint = time.monotonic()
        self.deadline = deadline  # time.monotonic() by which the run must checkpoint and end (time limit)
        self.timed_out = False
        self.write_refused = False  # a write was refused: the lease is gone
        self.stop_requested = stop_requested or threading.Event()
        self.heartbeat = Heartbeat(store, job.id, token, settings.cancel_poll_seconds,
                                   progress=lambda: (self.step, self.latest or None))
        self.meter = JobMeter(job.id, job.attempt)  # Prometheus rates (worker/metrics.py); job id in log lines

    @property
    def cancel(self) -> bool:
        return self.heartbeat.cancel

    @property
    def lost_lease(self) -> bool:
        return self.heartbeat.lost_lease or self.write_refused

    @property
    def shutdown(self) -> bool:
        """The worker is shutting down (preempt flag) or this process got SIGTERM: checkpoint and requeue."""
        return self.heartbeat.preempt or self.stop_requested.is_set()

    def flush(self, force: bool = False) -> None:
        """Write the pending events. The database being down keeps them for a later try (with backoff);
        an event the database refuses is dropped with a log line; neither stops the training."""
        now = time.monotonic()
        self.last_flush = now
        if not self.pending or (not force and now < self.flush_retry_at):
            return
        try:
            self.store.events.add_events(self.job_id, self.pending, token=self.token)
        except LeaseLost:
            self.pending, self.write_refused = [], True
            return
        except Exception as error:  # noqa: BLE001 - sorted below; events never fail the job
            if is_transient(error):
                self.flush_delay = min(10.0, max(0.5, self.flush_delay * 2))
                self.flush_retry_at = now + self.flush_delay
                log.warning("job %s: %d events not written yet (%s); retrying in %.1f s", self.job_id,
                            len(self.pending), type(error).__name__, self.flush_delay)
                self._trim_pending()
                return
            self._write_one_by_one()
            return
        self.pending, self.flush_delay, self.flush_retry_at = [], 0.0, 0.0

    def _trim_pending(self) -> None:
        if len(self.pending) > MAX_PENDING_EVENTS:
            excess = len(self.pending) - MAX_PENDING_EVENTS
            metrics = [i for i, e in enumerate(self.pending) if e["type"] == "metrics"][:excess]
            drop = set(metrics)
            self.pending = [e for i, e in enumerate(self.pending) if i not in drop][-MAX_PENDING_EVENTS:]

    def _write_one_by_one(self) -> None:
        """A batch the database refused (not an outage): keep every event it accepts."""
        kept, dropped = self.pending, 0
        self.pending = []
        for event in kept:
            try:
                self.store.events.add_events(self.job_id, [event], token=self.token)
            except LeaseLost:
                self.write_refused = True
                return
            except Exception as error:  # noqa: BLE001
                if is_transient(error):  # the database went away meanwhile: keep the rest for later
                    self.pending = kept[kept.index(event):]
                    return
                dropped += 1
                log.error("job %s: dropped a %s event the database refused: %s", self.job_id, event["type"],
                          str(error).splitlines()[0])

    def sync(self, step: int) -> None:
        """Before the runner decides what happened: every event written, progress and flags fresh
        (waiting out a database outage for up to db_retry_seconds)."""
        self.step = step
        budget = self.settings.db_retry_seconds
        deadline = time.monotonic() + budget
        self.flush(force=True)
        while self.pending and not self.write_refused and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.1, self.flush_retry_at - time.monotonic())))
            self.flush(force=True)
        retry_transient(self.heartbeat.beat_now, max(0.0, deadline - time.monotonic()),
                        f"job {self.job_id}: final heartbeat")

    def note(self, message: str, level: str = "info", data: dict | None = None) -> None:
        self.pending.append({"type": "message", "level": level, "message": message, "data": data})

    def on_step(self, trainer, metrics):
        self.step = trainer.step
        self.meter.on_step(trainer, metrics)
        self.latest = {**self.latest, "loss": metrics["loss"], "lr": metrics["lr"]}
        every = max(self.settings.event_every_steps,  # long jobs: at most ~max_metrics_events metrics events
                    -(-trainer.total_steps // self.settings.max_metrics_events))
        if trainer.step % every == 0:
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
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True  # the runner checkpoints, then ends the job `time_limit`
        elif (trainer.step % self.settings.checkpoint_every_steps == 0 and trainer.step < trainer.total_steps
                and time.monotonic() - self.last_checkpoint >= self.settings.checkpoint_min_seconds):
            self.periodic_checkpoint(trainer)
        if time.monotonic() - self.last_flush >= self.settings.cancel_poll_seconds:
            self.flush()
        return self.cancel or self.lost_lease or self.shutdown or self.timed_out

    def periodic_checkpoint(self, trainer) -> None:
        """A periodic checkpoint that can't be written (full disk, database down) is skipped with a
        warning: training goes on, and the previous checkpoint stays the one to resume from."""
        self.last_checkpoint = time.monotonic()
        try:
            save_resume_checkpoint(trainer, self.store, self.artifacts, self.job_id, self.token, self.attempt)
        except LeaseLost:
            self.write_refused = True
        except Exception as error:  # noqa: BLE001 - sorted below
            if is_no_space(error):
                self.note(f"checkpoint at step {trainer.step} skipped: {no_space_reason(error, self.settings)}; "
                          "training goes on and the previous checkpoint stays the one to resume from",
                          level="warn", data={"step": trainer.step, "code": "no_space"})
            elif is_transient(error):
                log.warning("job %s: checkpoint at step %d not recorded (database unavailable); training on",
                            self.job_id, trainer.step)
            elif is_store_outage(error):
                log.warning("job %s: checkpoint at step %d not uploaded (artifact store unavailable: %s); "
                            "training on", self.job_id, trainer.step, type(error).__name__)
            else:
                raise


def no_space_reason(error: BaseException, settings: Settings) -> str:
    """"no space left on the artifact volume while writing <artifacts>/jobs/…/file (12,288 bytes free there)":
    the file the full disk refused (server paths scrubbed) and the room left on its volume."""
    path = None
    while error is not None and path is None:
        path = getattr(error, "path", None) if isinstance(error, NoSpaceError) else None
        error = error.__cause__ or error.__context__
    where = Path(path) if path is not None else Path(settings.artifact_dir)
    folder = next((p for p in (where, *where.parents) if p.is_dir()), None)
    try:
        free = f"{shutil.disk_usage(folder).free:,} bytes free there" if folder is not None else "free space unknown"
    except OSError:
        free = "free space unknown"
    what = scrub_paths(str(where), settings) if path is not None else "a file"
    return f"no space left on the artifact volume while writing {what} ({free})"


def save_resume_checkpoint(trainer: Trainer, store: JobStore, artifacts: Artifacts, job_id: str, token: str,
                           attempt: int, budget: float = 0.0) -> str:
    """Write the checkpoint to a file of its own and upload it to the artifact store (a bucket: so any
    worker can resume it), then publish its row (refused when the lease is lost: the file is removed),
    then delete the file the previous row pointed to. Returns the file name."""
    artifacts.job_dir(job_id)
    name = resume_name(attempt, trainer.step)
    path = trainer.save_checkpoint(artifacts.job_file(job_id, name))
    try:
        artifacts.upload(path)
        row = retry_transient(
            lambda: store.checkpoints.add_checkpoint(job_id, "resume", trainer.step, name, sha256_file(path), path.stat().st_size,
                                         metrics=trainer.eval_history[-1] if trainer.eval_history else None,
                                         token=token),
            budget, f"job {job_id}: checkpoint row")
    except BaseException:
        path.unlink(missing_ok=True)  # no row points at it
        _forget(artifacts, artifacts.job_key(job_id, name))
        raise
    for old in row.replaced:
        _forget(artifacts, artifacts.job_key(job_id, old))
    return name


def _forget(artifacts: Artifacts, key: str) -> None:
    """Remove an artifact nobody refers to; a store that can't be reached leaves it to the API's cleanup pass."""
    try:
        artifacts.remove(key)
    except Exception as error:  # noqa: BLE001 - logged; never hides the error being handled
        log.warning("could not remove %s from the artifact store: %s", key, type(error).__name__)


def publish(store: JobStore, job_id: str, token: str, attempt: int, final: Path, write: Callable[[Path], object],
            budget: float, artifacts: Artifacts | None = None) -> Path:
    """Write `final` through a temp file of this attempt's own, then rename it into place only while
    this run still holds the lease. A failed write leaves no temp file. With a bucket, the temp file is
    uploaded under its own key first and copied to the final key after the lease check."""
    tmp = final.with_name(f"{final.name}.a{attempt}.tmp")
    try:
        write(tmp)
        if artifacts is not None:
            artifacts.upload(tmp)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if artifacts is not None:
            _forget(artifacts, artifacts.key_of(tmp))
        if is_no_space(error):
            raise NoSpaceError(f"no space left on the device while writing {final.name}", final) from error
        raise
    if not retry_transient(lambda: store.leases.holds_lease(job_id, token), budget, f"job {job_id}: lease check"):
        tmp.unlink(missing_ok=True)
        if artifacts is not None:
            _forget(artifacts, artifacts.key_of(tmp))
        raise LeaseLost(job_id)
    if artifacts is not None:
        return artifacts.replace(tmp, final)
    os.replace(tmp, final)
    return final


def materialise(resolved_spec: dict, artifacts: Artifacts) -> dict:
    """The resolved spec with its storage keys (an uploaded dataset, weights, program or a job's export) turned
    into this node's paths, fetched from the store first. Anything that is not such a key is left as
    it is, for check_job_paths to judge."""
    tree = json.loads(json.dumps(resolved_spec))
    dataset, model = tree.get("dataset") or {}, tree.get("model") or {}
    for part, field, pattern, label in ((dataset, "path", DATASET_KEY, "dataset.path"),
                                        (model, "weights", WEIGHTS_KEY, "model.weights"),
                                        (model, "program", PROGRAM_KEY, "model.program")):
        if part is dataset and dataset.get("name") != "tensors":
            continue
        key = artifacts.spec_key(part.get(field), pattern)
        if key is not None:
            try:
                part[field] = str(artifacts.fetch(key))
            except MissingArtifact:
                raise ValueError(f"{label}: the file is no longer in the artifact store") from None
    return tree


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
        # how it ran: processes (all ranks), nodes, whether the ranks ended identical, micro-batches, autocast
        # dtype, share of time spent waiting for data, and the
        # measured batch-1 CPU latency (the sweep page's latency frontier)
        **{key: report[key] for key in ("devices", "nodes", "replicas_agree", "accumulate_steps", "precision",
                                        "data_wait_share", "export", "inference_latency_ms")
           if key in report},
    }


def run_job(job_id: str, settings: Settings, store: JobStore | None = None,
            stop_requested: threading.Event | None = None) -> str:
    """Returns what happened: succeeded, failed, cancelled, requeued, deferred (a spec newer than this
    release: handed back, store/spec_version.py) or skipped (not ours to run)."""
    return run_slot(job_id, settings, store, stop_requested)[0]


@observed  # the run's outcome, duration and attempt as Prometheus series (worker/metrics.py)
def run_slot(message_job_id: str, settings: Settings, store: JobStore | None = None,
             stop_requested: threading.Event | None = None,
             forward: Callable[[int], None] | None = None) -> tuple[str, str | None]:
    """One message = one slot: claim the fairest claimable job (Claims.claim) and run it.
    Returns (outcome, id of the job run, or None when nothing was claimed).

    A slot has its job's device class (worker/devices.py); one too big for this worker goes to
    `forward(devices)`, the queue of that class ("forwarded"), so the job keeps its slot.

    `stop_requested` (set from a SIGTERM handler) makes the job checkpoint and requeue at the next step.
    The run checkpoints and ends `time_limit` `time_limit_grace_seconds` before `job_time_limit_seconds`.
    """
    started = time.monotonic()
    store = store or JobStore(settings.database_url, settings)
    artifacts = Artifacts.from_settings(settings)
    claimed = claim_slot(message_job_id, settings, store, forward)
    if isinstance(claimed, str):
        return claimed, None
    job, token = claimed
    with tracing.job_span(job.id, job.attempt, job.trace_context) as span:  # the submitting request's trace
        outcome = JobRun(job, token, settings, store, artifacts, stop_requested, started).run()
        tracing.set_outcome(span, outcome[0])
    return outcome


def claim_slot(message_job_id: str, settings: Settings, store: JobStore,
               forward: Callable[[int], None] | None) -> tuple[Job, str] | str:
    """(job, lease token) of the job this slot starts, or what became of the slot: "forwarded" to the
    queue of a bigger device class, or "skipped" (nothing to claim)."""
    budget, devices = settings.db_retry_seconds, owned_devices(settings)
    job, token = retry_transient(
        lambda: store.claims.claim(message_job_id, settings.max_attempts, settings.lease_seconds,
                                   worker=f"{socket.gethostname()}:{os.getpid()}", devices=devices),
        budget, f"job {message_job_id}: claim")
    if job is not None:
        return job, token
    onward = retry_transient(lambda: store.claims.forward_class(message_job_id, devices), budget,
                             f"job {message_job_id}: forward")
    if onward is not None and forward is not None:
        log.info("message for job %s: a slot for %d devices, this worker has %d; sent on", message_job_id,
                 onward, devices, extra={"job_id": message_job_id})
        forward(onward)
        return "forwarded"
    log.info("message for job %s: nothing run (%s)", message_job_id, token, extra={"job_id": message_job_id})
    return "skipped"


class JobRun:
    """One claimed job, trained under its lease: `run` trains it, then ends it one of three ways: stopped
    early (`stopped`: requeued, out of time or cancelled), finished (`publish`: its outputs, then
    succeeded), or failed (`failed`). Returns the outcome and the job's id.

    A job on several nodes (`training.nodes` > 1) is not trained here: this run supervises its gang on the
    Ray cluster (worker/ray_gang.py), whose rank 0 runs a JobRun of its own with `gang` set (the same
    lease token, the same ending) and `resume` pinned by the supervisor, so every rank resumes alike."""

    def __init__(self, job: Job, token: str, settings: Settings, store: JobStore, artifacts: Artifacts,
                 stop_requested: threading.Event | None, started: float, gang: Gang | None = None,
                 resume: tuple[str, int] | None | bool = True):
        self.gang = gang
        self.resume = resume  # True: the latest resume checkpoint; else the (file name, size) to resume or None
        self.job, self.job_id, self.token = job, job.id, token
        self.settings, self.store, self.artifacts = settings, store, artifacts
        self.budget = settings.db_retry_seconds
        self.started = started
        limit = settings.job_time_limit_seconds
        deadline = started + max(limit / 2, limit - settings.time_limit_grace_seconds)
        self.callback = StoreCallback(store, artifacts, job, token, settings, stop_requested, deadline)
        # an MLflow run, or None; a gang's supervisor has none (its rank 0 tracks the job)
        self.tracker = None if self.on_several_nodes else job_tracker(job, settings, self._tracking_warning)
        self.published: list[tuple[str, Path]] = []  # (kind, path) of the files `publish` placed

    def _tracking_warning(self, message: str) -> None:
        self.callback.note(message, level="warn", data={"code": WARNING_CODE})

    @property
    def on_several_nodes(self) -> bool:
        """This run supervises a gang on the Ray cluster (it is not one of the gang's ranks)."""
        return self.gang is None and (self.job.resolved_spec.get("training") or {}).get("nodes", 1) > 1

    def run(self) -> tuple[str, str]:
        version = version_of(self.job.resolved_spec)
        if version > SPEC_VERSION:  # a newer release wrote it: not ours to judge, whether it parses or not
            return self.defer(version), self.job_id
        if self.on_several_nodes:
            return self.supervise(), self.job_id
        log.info("job %s: attempt %d started", self.job_id, self.job.attempt)
        self.callback.heartbeat.start()
        try:
            trainer, report = self.train()
            if self.callback.lost_lease:
                log.warning("job %s: lease lost, stopping without writing", self.job_id)
                return "skipped", self.job_id
            if trainer.stopped_early:
                return self.stopped(trainer), self.job_id
            self.publish(trainer, report)
            self.finish("succeeded", "succeeded", result=summary(report))
            return "succeeded", self.job_id
        except LeaseLost:
            log.warning("job %s: lease lost; its writes were refused, stopping", self.job_id)
            return "skipped", self.job_id
        except SoftTimeLimitExceeded:
            log.error("job %s: Celery's soft time limit interrupted it", self.job_id)
            self.finish("failed", f"the job reached its time limit ({self.settings.job_time_limit_seconds} s per "
                                  "run) before it could checkpoint", error_code="time_limit")
            return "failed", self.job_id
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with a readable error
            return self.failed(exc), self.job_id
        finally:
            if self.tracker is not None and not self.tracker.finished:  # requeued or lost: the run stays open
                self.tracker.finish("requeued", timeout=10.0)
            self.callback.heartbeat.stop()
            try:
                self.artifacts.release_job(self.job_id)  # a bucket holds the job's files; this node's copies go
            except OSError:
                log.warning("job %s: could not clear its local artifact folder", self.job_id)

    def defer(self, version: int) -> str:
        """Hand back a job whose spec is newer than this release reads (a rolling upgrade): requeued as a
        preemption, so no attempt is spent, with the reason on the job; the task re-sends its message after
        `spec_defer_seconds` (worker/tasks.py), so a worker that can read it takes it meanwhile."""
        why = (f"its spec is version {version}, this worker reads up to {SPEC_VERSION} (written by a newer "
               f"release); left queued for a worker that can read it, retried in {self.settings.spec_defer_seconds:g} s")
        log.warning("job %s: %s", self.job_id, why)
        requeued = retry_transient(lambda: self.store.leases.requeue(self.job_id, self.token, f"requeued: {why}"),
                                   self.budget, f"job {self.job_id}: defer")
        return "deferred" if requeued else "skipped"

    def supervise(self) -> str:
        """A job on several nodes: its gang on the Ray cluster (worker/ray_gang.py), this run holding the lease
        meanwhile. A worker without the `ray` extra fails the job with a message naming it."""
        from rigl_core.optional import MissingExtra, require

        self.callback.heartbeat.start()
        try:
            nodes = self.job.resolved_spec["training"].get("nodes", 1)
            try:
                require("ray.train", "ray", f"training.nodes: a job on {nodes} nodes")
            except MissingExtra as missing:
                log.error("job %s: %s", self.job_id, missing)
                self.finish("failed", str(missing), error_code="missing_extra")
                return "failed"
            from worker.ray_gang import supervise

            return supervise(self)
        except LeaseLost:
            log.warning("job %s: lease lost; its writes were refused, stopping", self.job_id)
            return "skipped"
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with a readable error
            return self.failed(exc)
        finally:
            self.callback.heartbeat.stop()

    def resume_file(self) -> tuple[str, int] | None:
        """(file name, size) of the checkpoint this run resumes from, or None to start afresh."""
        if self.resume is not True:
            return self.resume or None
        row = retry_transient(lambda: self.store.checkpoints.latest_checkpoint(self.job_id, "resume"), self.budget,
                              f"job {self.job_id}: resume checkpoint")
        return None if row is None else (row.filename, row.size)

    def build_trainer(self, callbacks: list[Callback]) -> Trainer:
        """The job's Trainer on this node (its stored files fetched first), resumed from `resume_file()`."""
        artifacts = self.artifacts
        resolved = on_this_node(materialise(self.job.resolved_spec, artifacts), self.settings)  # keys -> files
        check_job_paths(resolved, self.settings)  # confined to this worker's datasets/uploads dirs
        trainer = Trainer(JobSpec.model_validate(spec_body(resolved)), callbacks=callbacks, gang=self.gang)
        resume = self.resume_file()
        if resume is not None:
            trainer.load_checkpoint(artifacts.fetch(artifacts.job_key(self.job_id, resume[0]), resume[1]))
        return trainer

    def train(self) -> tuple[Trainer, dict]:
        """Train from the job's resume checkpoint if it has one; every event written when it returns."""
        callback = self.callback
        if self.tracker is not None:
            self.tracker.start()  # the run opens while the Trainer loads the data and builds the model
        trainer = self.build_trainer([callback, *([self.tracker] if self.tracker is not None else [])])
        if trainer.resumed_from is not None:
            callback.step = trainer.step
            callback.note(f"resumed from step {trainer.step}", data={"resumed_from_step": trainer.step})
            callback.flush(force=True)
        report = trainer.fit()
        callback.sync(trainer.step)
        return trainer, report

    def stopped(self, trainer: Trainer) -> str:
        """Stopped before the end: checkpoint, then requeue (shutdown), fail `time_limit`, or cancel."""
        saved = self.save_final_checkpoint(trainer)
        callback, settings = self.callback, self.settings
        if callback.shutdown and not callback.cancel:
            why = "worker process stopped (SIGTERM)" if callback.stop_requested.is_set() else "worker shutting down"
            requeued = retry_transient(
                lambda: self.store.leases.requeue(self.job_id, self.token, f"{why} at step {trainer.step}; will resume"),
                self.budget, f"job {self.job_id}: requeue")
            return "requeued" if requeued else "skipped"
        if callback.timed_out and not callback.cancel:
            limit = settings.job_time_limit_seconds
            self.finish("failed", f"the job reached its time limit ({limit} s per run) at step {trainer.step}; "
                                  f"{saved}", error_code="time_limit")
            return "failed"
        self.finish("cancelled", f"cancelled at step {trainer.step}")
        return "cancelled"

    def save_final_checkpoint(self, trainer: Trainer) -> str:
        """A checkpoint to resume from; one that can't be written (full disk, bucket down) is noted, and a
        later run resumes from the previous one. Returns what happened, for the job's message."""
        callback = self.callback
        try:
            save_resume_checkpoint(trainer, self.store, self.artifacts, self.job_id, self.token, self.job.attempt,
                                   self.budget)
            return "a checkpoint was saved"
        except NoSpaceError as error:
            why, code = no_space_reason(error, self.settings), "no_space"
        except Exception as error:  # noqa: BLE001 - a bucket that can't be reached: as a full disk
            if not is_store_outage(error):
                raise
            why, code = "the artifact store was unavailable", "storage_unavailable"
        callback.note(f"checkpoint at step {trainer.step} skipped: {why}", level="warn",
                      data={"step": trainer.step, "code": code})
        callback.sync(trainer.step)
        return f"no checkpoint could be saved ({why})"

    def publish(self, trainer: Trainer, report: dict) -> None:
        """The report and every export (rigl_core/export/pipeline.py), each placed under the lease and
        uploaded (`publish`), each export with its checkpoint row."""
        job_id, token, store = self.job_id, self.token, self.store
        report["spec"] = self.job.spec

        def put(final: Path, write: Callable[[Path], object]) -> Path:
            return publish(store, job_id, token, self.job.attempt, final, write, self.budget, self.artifacts)

        for output, path in write_outputs(TrainedRun.of(trainer, report), self.artifacts.job_dir(job_id), put,
                                          self.skipped):
            self.published.append((output.kind, path))
            if not output.is_export:
                continue
            sha, size = sha256_file(path), path.stat().st_size
            retry_transient(lambda: store.checkpoints.add_checkpoint(job_id, output.kind, trainer.step,
                                                                     output.filename, sha, size,
                                                                     metrics=report["final_metrics"], token=token),
                            self.budget, f"job {job_id}: {output.kind} checkpoint row")

    def skipped(self, output: OutputFile, error: Exception) -> None:
        """An optional export (ONNX) that failed is noted on the job, never its end; a lost lease, a full disk
        or an unreachable bucket still are."""
        if isinstance(error, (LeaseLost, NoSpaceError)) or is_store_outage(error):
            raise error
        first = scrub_paths(str(error).splitlines()[0], self.settings) if str(error) else type(error).__name__
        self.callback.note(f"{output.kind} export skipped: {first}", level="warn",
                           data={"code": "export_skipped", "export": output.kind})
        self.callback.sync(self.callback.step)

    def failed(self, exc: Exception) -> str:
        if self.gang is not None and isinstance(exc, RuntimeError):  # a collective broke: maybe a rank was
            raise exc  # lost, which is no failure of the job; its supervisor tells (worker/ray_gang.py `settle`)
        log.error("job %s failed: %s", self.job_id, traceback.format_exc())
        if is_no_space(exc):  # failed, not requeued: a full volume stays full until an operator acts
            self.finish("failed", no_space_reason(exc, self.settings), error_code="no_space")
        elif is_store_outage(exc):  # its message names the bucket's endpoint: not shown
            self.finish("failed", "the artifact store was unavailable", error_code="storage_unavailable")
        else:
            code = "invalid_job" if isinstance(exc, ValueError) else "training_error"
            message = scrub_paths(str(exc).splitlines()[0], self.settings) if str(exc) else type(exc).__name__
            self.finish("failed", message, error_code=code)
        return "failed"

    def end_tracking(self, status: str, result: dict | None) -> None:
        """End the job's MLflow run before the job itself (its warnings are events of the job): on success
        with the report, the exports and the MLflow model, and the run's place in the job's result."""
        tracker = self.tracker
        if tracker is None or tracker.finished:
            return
        files, onnx, extra = run_files(path for _kind, path in self.published) \
            if status == "succeeded" else ([], None, [])
        report = None
        if result is not None:
            report = {"totals": {k: result.get(k) for k in ("sparsity", "overall_sparsity", "inference_flops_ratio",
                                                            "training_flops_ratio")},
                      "final_metrics": result.get("final_metrics"), "steps": result.get("steps")}
        tracker.finish(status, report, files, onnx, extra)
        if result is not None and tracker.info() is not None:
            result["mlflow"] = tracker.info()
        if self.callback.pending:
            self.callback.sync(self.callback.step or 0)

    def finish(self, status: str, message: str, **kwargs) -> None:
        log.info("job %s: %s%s", self.job_id, status, f" ({kwargs['error_code']}: {message})"
                 if kwargs.get("error_code") else "")
        try:
            self.end_tracking(status, kwargs.get("result"))
        except Exception:  # noqa: BLE001 - MLflow never decides how a job ends
            log.warning("job %s: ending its MLflow run failed: %s", self.job_id, traceback.format_exc())
        try:
            retry_transient(lambda: self.store.leases.finish(self.job_id, self.token, status, message, **kwargs),
                            self.budget, f"job {self.job_id}: finish")
        except Exception:  # noqa: BLE001 - the reaper requeues it once the lease lapses
            log.error("job %s: could not record %s: %s", self.job_id, status, traceback.format_exc())
