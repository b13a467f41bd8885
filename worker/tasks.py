"""The one task: train a job by id. The body delegates to worker.runner.

A shared task: it belongs to whichever app the worker built (worker/app.py), so importing this module
builds no app; it sends its follow-up messages through the app that runs it (`self.app`)."""

from __future__ import annotations

import signal
import threading

import rigl_core.training.trainer  # noqa: F401 - preload torch in the parent so each fresh child starts fast
from celery import shared_task
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutting_down

from service_common import tracing
from service_common.celery_app import TRAIN_TASK, enqueue_train
from worker import reaping  # noqa: F401 - the worker's reaper thread (signals)

# Set in the worker's main process when its warm shutdown begins. A pool process forked after that
# (the job that was running requeued itself and its process exited) inherits it and hands its
# message back instead of claiming a job that the shutdown would then kill mid-run.
shutting_down = threading.Event()


@shared_task(bind=True, name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train(self, job_id: str) -> str:
    """SIGTERM to this pool process (Celery cancels running tasks when it loses the broker; an
    operator's `kill`) asks the job to checkpoint and requeue at the next step. Billiard's default
    handler raised SystemExit wherever the process was, even inside a database call, and a job
    interrupted there was marked failed."""
    from celery.exceptions import Reject

    from store.dispatch import dispatch
    from store.jobs import JobStore
    from store.settings import get_settings
    from worker.devices import slot_queue
    from worker.retry import is_transient, retry_transient
    from worker.runner import run_slot

    from service_common.log_context import job_id_var

    job_id_var.set(job_id)  # this process's lines name the message's job (the run's own, once it claims one)
    if shutting_down.is_set():
        raise Reject("this worker is shutting down", requeue=True)
    allow_child_processes()
    stop_requested = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())
    try:
        settings = get_settings()
        store = JobStore(settings.database_url, settings)

        def forward(devices: int) -> None:  # to the workers owning ≥ devices; unsent: the reaper re-sends it
            queue = slot_queue(settings.queue, devices)
            retry_transient(lambda: dispatch(store, lambda job: enqueue_train(self.app, job, queue), job_id),
                            settings.db_retry_seconds, f"job {job_id}: slot for {devices} devices")

        try:  # the message is a slot: the job run is the fairest claimable one (Claims.claim)
            outcome, ran = run_slot(job_id, settings, store, stop_requested=stop_requested, forward=forward)
        except Exception as error:
            if is_transient(error):  # the database stayed down longer than db_retry_seconds: try later
                raise Reject(f"database unavailable: {type(error).__name__}", requeue=True) from error
            raise
        if outcome in ("requeued", "deferred", "waiting"):  # handed back: send its message on
            send_on(self.app, store, settings, ran, outcome)
        elif outcome in ("succeeded", "failed", "cancelled"):  # a slot under its owner's cap came free
            release_sweep_children(store, settings, self.app)
        return outcome
    finally:
        signal.signal(signal.SIGTERM, previous)


def send_on(app, store, settings, job_id: str, outcome: str) -> None:
    """The message of a job this worker handed back: at once after a preemption (the next worker resumes it),
    `spec_defer_seconds` later when its spec was too new here (store/spec_version.py), so an old worker
    doesn't take it straight back and spin, `ray_retry_seconds` later when its gang could not be placed on
    the Ray cluster (`waiting`); unsent (broker down): the reaper sends it."""
    from store.dispatch import dispatch
    from worker.retry import retry_transient

    countdown = {"deferred": settings.spec_defer_seconds, "waiting": settings.ray_retry_seconds}.get(outcome)
    retry_transient(lambda: dispatch(store, lambda job: enqueue_train(app, job, settings.queue, countdown), job_id),
                    settings.db_retry_seconds, f"job {job_id}: requeue message")


def release_sweep_children(store, settings, app) -> None:
    """Held sweep children of the finished job's owner (and any other) start now rather than at the next
    reaper pass (store/sweeps.py); a failure here only delays them to that pass."""
    import logging

    from store.sweeps import release_held

    try:
        release_held(store, lambda job: enqueue_train(app, job, settings.queue),
                     settings.max_active_jobs_per_owner)
    except Exception:  # noqa: BLE001 - the reaper releases them later
        logging.getLogger("rigl.worker").exception("could not release held sweep children")


def allow_child_processes() -> None:
    """Billiard marks its pool processes daemonic, and multiprocessing refuses to start children of a
    daemonic process ("daemonic processes are not allowed to have children"); a streamed dataset
    decodes images in DataLoader worker processes started from this one. Clearing the flag is safe
    here: this process runs a single task (worker_max_tasks_per_child=1) and the loader's workers are
    daemonic themselves, watch this process and are stopped when the job's feed closes or it dies."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # the setter refuses a started process


@worker_process_init.connect
def _start_tracing(**_kwargs) -> None:
    """Each pool process (a fresh one per job) sets tracing up itself when OTEL_* asks for it: an exporter's
    thread doesn't survive the fork (service_common/tracing.py)."""
    tracing.setup("rigl-worker")


@worker_process_shutdown.connect
def _flush_traces(**_kwargs) -> None:
    """The pool process exits without atexit hooks: export the spans that ended after the job's (the
    Celery task's own span) before it goes."""
    tracing.flush()


@worker_shutting_down.connect
def _preempt_running_jobs(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    """SIGTERM (warm shutdown): ask the running job to checkpoint and requeue itself instead of the
    worker waiting hours for it to finish; the next worker resumes it from that checkpoint."""
    import logging
    import socket

    from celery.worker import state

    from store.jobs import JobStore
    from store.settings import get_settings
    from worker.retry import retry_transient

    shutting_down.set()
    # by training process, not by the message's job id: a message is a slot for the fairest job
    holders = [f"{socket.gethostname()}:{request.worker_pid}" for request in list(state.active_requests)
               if request.worker_pid]
    if holders:
        try:
            store = JobStore(get_settings().database_url)
            retry_transient(lambda: store.leases.request_preempt(holders=holders), 30, "preempt on shutdown")
        except Exception:  # noqa: BLE001 - the database is down: the job runs on; a later SIGTERM stops it
            logging.getLogger("rigl.worker").exception("could not ask the running job to checkpoint")
