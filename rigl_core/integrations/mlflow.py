"""MLflow tracking: a Trainer callback that makes a run an MLflow run, and the model-registry step.

Teams already read their experiments in MLflow, so a job (or `rigl train`) is logged there too: the
JobSpec as params (flattened, `sparsity.schedule.delta_t`), the per-step metrics and the per-layer
sparsity as metrics, the report and the exports as artifacts, and the ONNX export as an MLflow model
(ONNX flavor: self-contained, loadable with `mlflow.pyfunc` and no rigl_core; the sparse packed export
rides along as its extra file) that `register_model` turns into a registered model version.

The caller's own records stay the source of truth, so MLflow never slows or fails a run: every call
goes through one background thread (`Sender`), is retried `retries` times with doubling backoff, and
a call that still fails becomes a warning (`warn`, delivered on the training thread) after which the
run's logging stops. Metrics are buffered as plain tuples and sent with `log_batch` at most every
`flush_seconds` (checked at logged steps and evaluations; and when a batch is full), so a training step
only appends to a list, and a fast run makes a few requests a minute, not one per epoch.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from rigl_core.optional import require
from rigl_core.training.trainer import Callback

DEFAULT_EXPERIMENT = "rigl"
MODEL_PATH = "model"  # the run's artifact folder holding the MLflow model
JOB_TAG = "rigl.job_id"
MAX_PARAMS_PER_BATCH = 100  # MLflow's limits on one log_batch
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
CLOSE = "close"  # the sender's last task: runs even after a failure
RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}


def _mlflow():
    return require("mlflow", "mlflow", "MLflow tracking")


# ---------------------------------------------------------------------------------------------- where
@dataclass(frozen=True)
class MlflowTarget:
    """Where a run is logged: the tracking URI, the experiment and the run's name."""

    uri: str
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None


def resolve_target(tracking: dict | None, default_uri: str | None, default_experiment: str = DEFAULT_EXPERIMENT,
                   run_name: str | None = None) -> MlflowTarget | None:
    """The one rule for whether and where a job is logged: the JobSpec's `tracking.mlflow` (a dict as
    dumped) over the deployment's URI and experiment. None: not tracked (no URI anywhere, or turned off)."""
    spec = (tracking or {}).get("mlflow") or {}
    if spec.get("enabled") is False:
        return None
    uri = spec.get("uri") or default_uri
    if not uri:
        return None
    return MlflowTarget(uri, spec.get("experiment") or default_experiment or DEFAULT_EXPERIMENT,
                        spec.get("run_name") or run_name)


def asked_for(tracking: dict | None) -> bool:
    """The JobSpec names `tracking.mlflow` and does not turn it off."""
    spec = (tracking or {}).get("mlflow")
    return spec is not None and spec.get("enabled") is not False


def shown_uri(uri: str) -> str:
    """The URI without user:password, for results and messages."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, parts.query,
                       parts.fragment))


# ---------------------------------------------------------------------------------------------- what
def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested JobSpec as MLflow params: `section.field` keys, lists and mappings of values as JSON,
    values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
            continue
        text = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)
        out[name] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 1] + "…"
    return out


def layer_sparsity(trainer) -> dict[str, float]:
    """Each masked layer's current sparsity, as metrics `sparsity/<layer>`."""
    masks = getattr(getattr(trainer, "sparsifier", None), "masks", None) or {}
    return {f"sparsity/{name}": 1.0 - float(mask.count_nonzero()) / mask.numel()
            for name, mask in masks.items() if mask.numel()}


def numeric(metrics: dict, skip: Iterable[str] = ("step", "epoch")) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ---------------------------------------------------------------------------------------------- how
class Sender(threading.Thread):
    """Runs MLflow calls in order off the training thread, each retried with doubling backoff. The first
    call that still fails is reported (`warnings`) and every later call is dropped, so an MLflow server
    that is down costs the run one retry sequence, never a stall per step."""

    def __init__(self, retries: int = 3, backoff: float = 0.5):
        super().__init__(name="mlflow-sender", daemon=True)
        self.retries, self.backoff = max(1, retries), backoff
        self.tasks: queue.Queue = queue.Queue()
        self.broken = False
        self.dropped = 0
        self._lock = threading.Lock()
        self._warnings: list[str] = []

    def submit(self, label: str, call: Callable[[], object]) -> None:
        self.tasks.put((label, call))

    def run(self) -> None:
        while True:
            task = self.tasks.get()
            try:
                if task is None:
                    return
                label, call = task
                if label == CLOSE:
                    call()
                elif self.broken:
                    self.dropped += 1
                else:
                    self._attempt(label, call)
            finally:
                self.tasks.task_done()

    def _attempt(self, label: str, call: Callable[[], object]) -> None:
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            try:
                call()
                return
            except Exception as error:  # noqa: BLE001 - MLflow never fails the run: reported, then off
                if attempt == self.retries:
                    first = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
                    self.broken = True
                    self.warn(f"MLflow logging stopped: {label} failed {self.retries} times ({first})")
                    return
                time.sleep(delay)
                delay *= 2

    def warn(self, message: str) -> None:
        with self._lock:
            self._warnings.append(message)

    def take_warnings(self) -> list[str]:
        with self._lock:
            taken, self._warnings = self._warnings, []
        return taken

    def close(self, timeout: float) -> bool:
        """Send what is queued, then stop; False when that took longer than `timeout` (the rest is left)."""
        done = threading.Event()
        self.submit(CLOSE, done.set)
        finished = done.wait(timeout)
        self.tasks.put(None)
        return finished


class MlflowCallback(Callback):
    """Logs a Trainer run to MLflow (see the module docstring). `job_id`: the run carries it as a tag and a
    later attempt of the same job (a resumed job) continues that run instead of starting another.
    `warn(message)` is called on the training thread when MLflow failed (the worker turns it into a
    warning event on the job). Call `finish` once the run has ended."""

    def __init__(self, target: MlflowTarget, params: dict | None = None, tags: dict | None = None,
                 job_id: str | None = None, warn: Callable[[str], None] | None = None, flush_seconds: float = 5.0,
                 retries: int = 3, backoff: float = 0.5, http_timeout: float = 10.0):
        _mlflow()
        # our own retries (in Sender) replace the MLflow HTTP client's: its defaults retry a refused
        # connection for minutes. An operator's own MLFLOW_HTTP_* settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(http_timeout)))
        from mlflow.tracking import MlflowClient

        self.target, self.job_id = target, job_id
        self.client = MlflowClient(tracking_uri=target.uri)
        self.params, self.tags = params or {}, {k: str(v) for k, v in (tags or {}).items()}
        self._warn = warn
        self.flush_seconds = flush_seconds
        self.sender = Sender(retries, backoff)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step) not sent yet
        self.last_flush = time.monotonic()
        self.started = False
        self.finished = False

    # ------------------------------------------------------------------ the run
    def start(self, wait: float = 0.0) -> None:
        """Open (or, for a resumed job, find) the run and log params and tags, in the sender thread; waits
        up to `wait` seconds for it (call it before training: the run is open before the first step)."""
        if self.started:
            return
        self.started = True
        self.sender.start()
        self.sender.submit("opening the run", self._open)
        if wait > 0:
            opened = threading.Event()
            self.sender.submit("opened", opened.set)
            opened.wait(wait)

    def _open(self) -> None:
        from mlflow.entities import Param, RunTag

        client, target = self.client, self.target
        experiment = client.get_experiment_by_name(target.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(target.experiment)
        run = None
        if self.job_id is not None:
            found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{self.job_id}'",
                                       max_results=1)
            run = found[0] if found else None
        if run is None:
            tags = {**self.tags, **({JOB_TAG: self.job_id} if self.job_id else {})}
            run = client.create_run(experiment_id, tags=tags, run_name=target.run_name)
            params = [Param(k, v) for k, v in flatten(self.params).items()]
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                client.log_batch(run.info.run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in self.tags.items()])
        self.experiment_id, self.run_id = experiment_id, run.info.run_id

    def info(self) -> dict | None:
        """Where the run is, once opened: for the job's result (the URI without credentials)."""
        if self.run_id is None:
            return None
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": self.target.experiment,
                "tracking_uri": shown_uri(self.target.uri)}

    # ------------------------------------------------------------------ metrics
    def _add(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending.extend((key, value, now, step) for key, value in values.items())

    def _due(self) -> None:
        if len(self.pending) >= MAX_METRICS_PER_BATCH or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered metrics to the sender, in batches MLflow accepts (the entities are built there)."""
        batch, self.pending, self.last_flush = self.pending, [], time.monotonic()
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.sender.submit("logging metrics", lambda chunk=batch[i:i + MAX_METRICS_PER_BATCH]: self._send(chunk))
        self.deliver_warnings()

    def _send(self, chunk: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(*values) for values in chunk])

    def on_step(self, trainer, metrics):
        if not self.started:
            self.start()
        self._add(numeric(metrics), trainer.step)
        self._due()

    def on_eval(self, trainer, metrics):
        if not self.started:
            self.start()
        self._add({**numeric(metrics), **layer_sparsity(trainer)}, trainer.step)
        self._due()

    def on_mask_update(self, trainer, update):
        self._add({f"mask/{k}": v for k, v in numeric(update.to_dict()).items()}, update.step)

    def deliver_warnings(self) -> None:
        for message in self.sender.take_warnings():
            if self._warn is not None:
                self._warn(message)

    # ------------------------------------------------------------------ the end
    def finish(self, status: str, report: dict | None = None, files: Iterable[tuple[Path, str]] = (),
               onnx: Path | None = None, model_files: Iterable[Path] = (), timeout: float = 120.0) -> None:
        """End the run: the report's totals as metrics, `files` as artifacts (path, artifact folder), the
        ONNX export as the run's MLflow model (with `model_files` beside it), then the run's status
        (succeeded, failed, cancelled; anything else leaves it running for the next attempt). Waits up
        to `timeout` for MLflow; what is left is a warning."""
        if self.finished:
            return
        self.finished = True
        if not self.started:
            self.start()
        if report is not None:
            totals = {f"final/{k}": v for k, v in numeric(report.get("totals") or {}).items()}
            finals = {f"final/{k}": v for k, v in numeric(report.get("final_metrics") or {}).items()}
            self._add({**totals, **finals}, int(report.get("steps") or 0))
        self.flush()
        for path, folder in files:
            self.sender.submit(f"uploading {path.name}",
                               lambda path=path, folder=folder: self.client.log_artifact(self.run_id, str(path),
                                                                                         folder or None))
        if onnx is not None:
            self.sender.submit("logging the model", lambda: self._log_model(onnx, list(model_files)))
        if status in RUN_STATUS:
            self.sender.submit("ending the run", lambda: self.client.set_terminated(self.run_id, RUN_STATUS[status]))
        if not self.sender.close(timeout):
            self.sender.warn(f"MLflow logging stopped: not done after {timeout:.0f} s")
        self.deliver_warnings()

    def _log_model(self, onnx_path: Path, extra: list[Path]) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = save_onnx_model(onnx_path, Path(tmp) / MODEL_PATH, extra,
                                     metadata={"rigl.job_id": self.job_id} if self.job_id else None)
            self.client.log_artifacts(self.run_id, str(folder), MODEL_PATH)


def run_files(paths: Iterable[Path]) -> tuple[list[tuple[Path, str]], Path | None, list[Path]]:
    """What of a run's written files goes where: (artifacts as (path, folder): the report at the top, the
    exports under exports/; the ONNX export, which becomes the MLflow model, or None; the files that go
    into that model beside it: the sparse packed export)."""
    from rigl_core.export.formats import ONNX_EXPORT, PACKED_EXPORT, REPORT

    paths = list(paths)
    names = {path.name: path for path in paths}
    files = [(path, "" if path.name == REPORT else "exports") for path in paths]
    return files, names.get(ONNX_EXPORT), [names[PACKED_EXPORT]] if PACKED_EXPORT in names else []


def save_onnx_model(onnx_path: Path, dest: Path, extra_files: Iterable[Path] = (), metadata: dict | None = None
                    ) -> Path:
    """An MLflow model folder (ONNX flavor) of our ONNX export, with `extra_files` (the sparse exports)."""
    onnx = require("onnx", "onnx", "An MLflow model of the ONNX export")
    flavor = require("mlflow.onnx", "mlflow", "MLflow models")
    flavor.save_model(onnx.load(str(onnx_path)), str(dest), extra_files=[str(p) for p in extra_files] or None,
                      metadata=metadata, onnx_execution_providers=["CPUExecutionProvider"])
    return dest


def register_model(uri: str, run_id: str, name: str, tags: dict | None = None, description: str | None = None):
    """Register the run's MLflow model (`runs:/<run>/model`) as a new version of model `name` (created
    when missing), with `tags` and `description` (the lineage). Returns MLflow's ModelVersion."""
    _mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{run_id}/{MODEL_PATH}", run_id=run_id,
                                       tags={k: str(v) for k, v in (tags or {}).items()}, description=description)


def has_model(uri: str, run_id: str) -> bool:
    """The run holds an MLflow model (its MLmodel file)."""
    _mlflow()
    from mlflow.tracking import MlflowClient

    return any(item.path == f"{MODEL_PATH}/MLmodel"
               for item in MlflowClient(tracking_uri=uri).list_artifacts(run_id, MODEL_PATH))
