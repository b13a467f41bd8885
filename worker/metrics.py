"""Worker metrics for Prometheus: training speed per running job, and how runs end.

Design: prometheus_client's multiprocess mode, served on one HTTP port per worker node.
Each job trains in a fresh Celery pool process (`max_tasks_per_child=1`) that exits when its run
ends, so a registry kept in that process would lose its counters with it, and a port per job
process could not be scraped. In multiprocess mode every process writes its values to memory-mapped
files in one folder (PROMETHEUS_MULTIPROC_DIR, set by `setup` before Celery forks); the worker's main
process, which lives as long as the worker, serves the sum of all of them on `worker_metrics_port`,
so counters outlive the job processes, and a pool process's live gauges are dropped when it exits.
The port listens on `worker_metrics_host` (127.0.0.1 unless set) and wants the API's `metrics_token`
(`Authorization: Bearer …`, service_common/bearer.py) when one is set: job ids and throughput are not
for every host on the network.
- compose: one port per worker container, bound to 0.0.0.0 on the compose network only (never published);
  Prometheus finds the containers by DNS and sends the token (docker/prometheus.yml).
- `rigl serve`: the API reads the worker's folder (`worker_metrics_dir`) and adds these series to its
  own /metrics (api/metrics.py), so the embedded mode keeps a single scrape target and no extra port.
Not chosen: pushing values into the database or Redis for the API to export (a write on the training
path per interval, and the API would have to rebuild counter semantics itself), or a Pushgateway (one
more service, and a dead worker's series stay until deleted by hand).

Every job process would leave its own counter files (a scrape read 2,000 files of 1,000 jobs in
~200 ms), so an exiting pool process adds its counters and histograms into `<kind>_totals.db` and
removes its files, under a lock that the collectors take too (`FolderCollector`): a scrape never
sees a job's counts twice or not at all. A process killed outright leaves its files, still counted.

The hooks: `JobMeter.on_step` from StoreCallback.on_step (worker/runner.py) for the rates, and
`observed` around `run_slot` for the run's outcome, duration and attempt. Called in process (tests,
or a worker without a port or folder) the same series live in the default registry.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from service_common.log_context import job_id_var
from service_common.metrics_folder import FolderCollector, fold

log = logging.getLogger("rigl.worker")
RUN_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 3 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)
_meter: contextvars.ContextVar["JobMeter | None"] = contextvars.ContextVar("rigl_job_meter", default=None)
_series: SimpleNamespace | None = None


def setup(folder: Path | None, port: int | None, host: str = "127.0.0.1", token: str | None = None) -> Path | None:
    """In the worker's main process, before Celery forks its pool: multiprocess mode in `folder`
    (emptied: counters restart with the worker, which Prometheus' rate() expects) and, with a port,
    the HTTP endpoint on `host`, wanting `token` when set. Neither set: nothing (the series stay in
    each process, unread)."""
    if folder is None and port is None:
        return None
    if folder is None:  # one per port: two workers on a host need two ports anyway
        folder = Path(tempfile.gettempdir()) / f"rigl-worker-metrics-{port}"
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    if "prometheus_client" in sys.modules:  # imported before the variable was set: choose the value class again
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    from celery.signals import worker_process_shutdown

    worker_process_shutdown.connect(_process_exited, weak=False)
    if port is not None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        FolderCollector(registry, path=str(folder))
        serve(registry, port, host, token)
        log.info("worker metrics on %s:%d%s (multiprocess folder %s)", host, port,
                 ", token required" if token else "", folder)
    return folder


def serve(registry, port: int, host: str = "127.0.0.1", token: str | None = None):
    """prometheus_client's exposition app on `host`:`port` in a daemon thread, behind the metrics token
    (401 without it). Returns the server (its `server_address` is where it listens; `shutdown()` stops it)."""
    import threading
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    from service_common.bearer import bearer_allows

    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        if not bearer_allows(environ.get("HTTP_AUTHORIZATION"), token):
            start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b'{"error": {"code": "unauthorized", "message": "/metrics wants Authorization: Bearer '
                    b'<RIGL_METRICS_TOKEN>", "field": "Authorization"}}']
        return metrics_app(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="rigl-worker-metrics", daemon=True).start()
    return server


def _process_exited(pid=None, **_kwargs) -> None:
    """In the exiting pool process: drop its live gauges (a running job's rates), fold its counters."""
    from prometheus_client import multiprocess

    pid = pid or os.getpid()
    multiprocess.mark_process_dead(pid)
    try:
        fold(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), pid)
    except Exception:  # noqa: BLE001 - its files stay and are still counted
        log.exception("could not fold the metrics of process %d", pid)


def series() -> SimpleNamespace:
    """Created on first use, in the process that trains (after `setup` chose the mode)."""
    global _series
    if _series is None:
        from prometheus_client import Counter, Gauge, Histogram

        per_job = ["job_id", "device"]
        _series = SimpleNamespace(
            steps_per_second=Gauge("rigl_worker_steps_per_second", "Optimizer steps per second of a running job",
                                   per_job, multiprocess_mode="livesum"),
            images_per_second=Gauge("rigl_worker_images_per_second", "Training examples per second of a running "
                                    "job (steps × global batch size)", per_job, multiprocess_mode="livesum"),
            data_wait_share=Gauge("rigl_worker_data_wait_share", "Share of the last interval the training loop "
                                  "waited for data (0…1)", per_job, multiprocess_mode="livesum"),
            gpu_memory=Gauge("rigl_worker_gpu_max_memory_allocated_bytes", "torch.cuda.max_memory_allocated of a "
                             "running job (CUDA only)", per_job, multiprocess_mode="livemax"),
            steps=Counter("rigl_worker_steps", "Optimizer steps trained", ["device"]),
            images=Counter("rigl_worker_images", "Training examples seen (steps × global batch size)", ["device"]),
            runs=Counter("rigl_worker_job_runs", "Runs that ended, by outcome", ["outcome"]),
            attempts=Counter("rigl_worker_job_attempts", "Runs started: a job's first attempt or a later one "
                             "(a resumption after a preemption, or a retry after a lost worker)", ["attempt"]),
            preemptions=Counter("rigl_worker_preemptions", "Runs that checkpointed and requeued their job "
                                "(SIGTERM, warm shutdown)"),
            duration=Histogram("rigl_worker_job_run_duration_seconds", "Wall time of one run, claim to end",
                               ["outcome"], buckets=RUN_BUCKETS),
        )
    return _series


class JobMeter:
    """One run's rates, from the trainer's step reports; also tags this run's log lines with its job id."""

    def __init__(self, job_id: str, attempt: int):
        self.job_id, self.attempt = job_id, attempt
        self.last: tuple[float, int] | None = None
        self.device: str | None = None
        job_id_var.set(job_id)
        _meter.set(self)

    def on_step(self, trainer, metrics: dict) -> None:
        s = series()
        now, step = time.monotonic(), trainer.step
        self.device = self.device or str(trainer.device)
        labels = (self.job_id, self.device)
        if self.last is not None and step > self.last[1] and now > self.last[0]:
            steps, seconds = step - self.last[1], now - self.last[0]
            images = steps * trainer.spec.training.batch_size
            s.steps_per_second.labels(*labels).set(steps / seconds)
            s.images_per_second.labels(*labels).set(images / seconds)
            s.steps.labels(self.device).inc(steps)
            s.images.labels(self.device).inc(images)
        self.last = (now, step)
        if "data_wait_share" in metrics:
            s.data_wait_share.labels(*labels).set(metrics["data_wait_share"])
        if trainer.device.type == "cuda":
            import torch

            s.gpu_memory.labels(*labels).set(torch.cuda.max_memory_allocated(trainer.device))

    def close(self, outcome: str, seconds: float) -> None:
        s = series()
        s.attempts.labels("first" if self.attempt <= 1 else "later").inc()
        s.runs.labels(outcome).inc()
        s.duration.labels(outcome).observe(seconds)
        if outcome == "requeued":
            s.preemptions.inc()
        if self.device is not None:  # the job no longer runs here: its rates go (multiprocess mode: with
            multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ  # the process, which exits next)
            for gauge in (s.steps_per_second, s.images_per_second, s.data_wait_share, s.gpu_memory):
                gauge.labels(self.job_id, self.device).set(0)
                if not multiprocess:
                    gauge.remove(self.job_id, self.device)


def observed(run_slot):
    """Around worker.runner.run_slot: a run that claimed a job (it made a JobMeter) is counted with its
    outcome (`error` when it raised) and duration. Runs in a copied context, so the job id set for
    its log lines ends with it."""

    @functools.wraps(run_slot)
    def wrapper(*args, **kwargs):
        context = contextvars.copy_context()
        started = time.monotonic()
        outcome = "error"
        try:
            result = context.run(run_slot, *args, **kwargs)
            outcome = result[0]
            return result
        finally:
            meter = context.get(_meter)
            if meter is not None:
                try:
                    meter.close(outcome, time.monotonic() - started)
                except Exception:  # noqa: BLE001 - metrics never change what a run returns
                    log.exception("job %s: could not record its run metrics", meter.job_id)

    return wrapper
