"""Jobs on several nodes (`training.nodes` > 1), run by Ray Train, with the service still in charge.

The worker that claimed the job supervises it: it holds the lease (its JobRun's heartbeat), checks that the
Ray cluster can place the whole gang (a placement group of nodes × devices bundles: Ray reserves all of them
or none) and then starts a Ray Train `TorchTrainer` of that many workers. Ray Train forms the process group
(gloo on CPU, NCCL on GPUs); each rank builds our Trainer with its `Gang` (rigl_core/training/distributed.py),
the same code path as one-node DDP: all-reduced gradients and one seed, so RigL's masks agree on every rank.
Rank 0 runs a JobRun of its own (worker/runner.py) with the job's lease token: it streams events, checkpoints
into the bucket, publishes the exports and ends the job as a one-node run does. Every rank resumes from the
checkpoint the supervisor pinned, fetched from the bucket (RIGL_ARTIFACT_URL: nodes share no folder; each
rank caches into a temp folder of its own).

Stopping: cancel and the time limit reach rank 0 through its own heartbeat; a SIGTERM of the supervisor sets
the job's preempt flag, which rank 0's heartbeat reads (checkpoint, requeue). A lost rank or node ends the Ray
run (no Ray-level retries): the supervisor requeues the job as a failed attempt, as the reaper does for a lost
worker, and the next run resumes from the last checkpoint. A gang that cannot be placed within
`ray_placement_timeout_seconds` goes back to the queue untouched (`Leases.give_back`): nothing of the cluster
is held while it waits.

Ray nodes need the project installed, the database password as RIGL_DATABASE_PASSWORD(_FILE) if it has one
and the bucket's AWS_* credentials; every other setting comes from the supervisor (`rank_settings`).
The only module that imports ray (tests/stack/test_layering.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.placement_group import placement_group, remove_placement_group

from rigl_core.training.distributed import Gang
from store.artifacts import Artifacts
from store.job_state import WAITING_FOR_NODES
from store.jobs import JobStore
from store.secret_settings import without_password
from store.settings import Settings
from worker.retry import retry_transient

log = logging.getLogger("rigl.worker")

# Settings a rank never takes from the supervisor: its own folders, secrets (from its own environment), and
# what only a worker process uses (the broker, its metrics, the reaper).
NOT_SENT = {"data_dir", "artifact_dir", "database_password", "broker_password", "broker_url", "metrics_token",
            "worker_metrics_port", "worker_metrics_dir", "reaper", "worker_devices"}
COLLECTIVE_TIMEOUT_S = 600
CONNECT_ATTEMPTS = 4  # ray.init tries (2, 4, 8 s apart) before a job fails on a cluster it cannot reach
# Ray Train's own run records (no checkpoints: ours go to the bucket); a folder that exists on every node
RAY_STORAGE = os.path.join(tempfile.gettempdir(), "rigl-ray")
LOST = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerHealthCheckFailedError",
        "NodeDiedError", "DistBackendError")  # a rank's process or node went away, not a training error


@dataclass(frozen=True)
class GangShape:
    """The ranks a job needs on the Ray cluster: nodes × devices workers, one GPU each (or one CPU)."""

    nodes: int
    devices: int
    gpu: bool

    @classmethod
    def of(cls, training: dict, cluster: dict) -> "GangShape":
        """`training.device` auto uses GPUs when the cluster has any."""
        device = training.get("device", "auto")
        gpu = device.startswith("cuda") or (device == "auto" and cluster.get("GPU", 0) > 0)
        return cls(int(training.get("nodes", 1)), int(training.get("devices", 1)), gpu)

    @property
    def ranks(self) -> int:
        return self.nodes * self.devices

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": 1, "GPU": 1} if self.gpu else {"CPU": 1}

    @property
    def strategy(self) -> str:
        """One rank per node: each on a node of its own (STRICT_SPREAD); several: packed onto few nodes."""
        return "STRICT_SPREAD" if self.devices == 1 else "PACK"

    def describe(self) -> str:
        unit = "GPU" if self.gpu else "CPU"
        return f"{self.ranks} ranks ({self.nodes} nodes × {self.devices}, one {unit} each)"


def connect(address: str) -> bool:
    """Join the Ray cluster as a driver; True when this call connected (and should disconnect)."""
    if ray.is_initialized():
        return False
    import sys

    # A Celery pool process's stderr is a logging proxy without a file descriptor, and ray.init enables
    # faulthandler on sys.stderr: give it the process's real stderr for that call.
    proxy = sys.stderr
    sys.stderr = sys.__stderr__
    try:
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
                break
            except ConnectionError as exc:  # e.g. Ray Client's "Initialization failure from server" while the
                ray.shutdown()  # previous driver's session is still torn down: a hiccup, not the job's fault
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                log.warning("connecting to the Ray cluster failed (%s); retrying", exc)
                time.sleep(2.0 * 2 ** attempt)
    finally:
        sys.stderr = proxy
    return True


def can_place(shape: GangShape, timeout: float) -> bool:
    """Whether the cluster can hold the whole gang now: a placement group of every rank's bundle, reserved
    atomically by Ray (all or none), waited for up to `timeout` seconds, then released."""
    group = placement_group([dict(shape.resources) for _ in range(shape.ranks)], strategy=shape.strategy)
    try:
        return bool(group.wait(timeout_seconds=timeout))
    finally:
        remove_placement_group(group)


def rank_settings(sent: dict, folder: Path) -> Settings:
    """A rank's settings: the supervisor's, with this rank's own private folder (a bucket holds the job's
    files) and the secrets of its own environment. RIGL_DATASETS_DIR on the node overrides the supervisor's."""
    values = {**sent, "data_dir": folder, "artifact_dir": folder / "artifacts"}
    if os.environ.get("RIGL_DATASETS_DIR"):
        values.pop("datasets_dir", None)
    return Settings(**values).resolved()


def sent_settings(settings: Settings) -> dict:
    values = settings.model_dump(mode="json", exclude=NOT_SENT)
    values["database_url"] = without_password(values["database_url"])
    return values


def run_rank(config: dict) -> str | None:
    """One rank of the gang, in a Ray Train worker: build the job's Trainer with this rank's Gang and train.
    Rank 0 runs the job as a one-node worker would (events, checkpoints, exports, its end) and returns the
    outcome; the other ranks only train."""
    JobRun = config["run_class"]  # worker.runner.JobRun, handed over by the supervisor (which that module runs)
    context = ray.train.get_context()
    gang = Gang(context.get_world_rank(), context.get_world_size(), context.get_local_world_size(),
                ray.train.torch.get_device())
    folder = Path(tempfile.mkdtemp(prefix=f"rigl-rank{gang.rank}-"))
    store = None
    try:
        settings = rank_settings(config["settings"], folder)
        store = JobStore(settings.database_url, settings)
        artifacts = Artifacts.from_settings(settings)
        job = retry_transient(lambda: store.get_job(config["job_id"]), settings.db_retry_seconds,
                              f"job {config['job_id']}: rank {gang.rank}")
        started = time.monotonic() - max(0.0, time.time() - config["started_at"])  # the supervisor's start
        resume = tuple(config["resume"]) if config["resume"] else None
        run = JobRun(job, config["token"], settings, store, artifacts, None, started, gang=gang, resume=resume)
        places = gang_places(gang)
        if gang.rank == 0:
            nodes = len({place["node"] for place in places})
            run.callback.note(f"gang of {gang.world_size} ranks on {nodes} Ray nodes",
                              data={"code": "gang_started", "ranks": places})
            return run.run()[0]
        run.build_trainer([]).fit()
        return None
    finally:
        if store is not None:
            store.engine.dispose()
        shutil.rmtree(folder, ignore_errors=True)


def gang_places(gang: Gang) -> list[dict]:
    """Where every rank runs ({rank, host, pid, node}), gathered over the gang's process group: rank 0 notes
    it on the job, so an operator sees which Ray node holds which rank."""
    import socket

    import torch.distributed as dist

    place = {"rank": gang.rank, "host": socket.gethostname(), "pid": os.getpid(),
             "node": ray.get_runtime_context().get_node_id()}
    places: list = [None] * gang.world_size
    dist.all_gather_object(places, place)
    return places


def supervise(run) -> str:
    """Run `run`'s job (a worker.runner.JobRun holding the lease) as a gang on the Ray cluster; returns the
    outcome: succeeded, failed, cancelled, requeued, waiting (given back: the gang could not be placed) or
    skipped (the lease went elsewhere)."""
    settings = run.settings
    connected = connect(settings.ray_address)
    try:
        shape = GangShape.of(run.job.resolved_spec["training"], ray.cluster_resources())
        if not can_place(shape, settings.ray_placement_timeout_seconds):
            return give_back(run, shape)
        resume = run.resume_file()
        config = {"run_class": type(run), "job_id": run.job_id, "token": run.token, "settings": sent_settings(settings),
                  "resume": list(resume) if resume else None,
                  "started_at": time.time() - (time.monotonic() - run.started)}
        trainer = TorchTrainer(
            run_rank, train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if shape.gpu else "gloo", timeout_s=COLLECTIVE_TIMEOUT_S),
            scaling_config=ScalingConfig(num_workers=shape.ranks, use_gpu=shape.gpu,
                                         resources_per_worker=shape.resources, placement_strategy=shape.strategy),
            run_config=RunConfig(name=f"rigl-{run.job_id}-a{run.job.attempt}", storage_path=RAY_STORAGE,
                                 failure_config=FailureConfig(max_failures=0)))
        log.info("job %s: starting its gang on the Ray cluster: %s", run.job_id, shape.describe())
        outcome, error = fit_watching(trainer, run)
        return settle(run, outcome, error)
    finally:
        if connected:
            ray.shutdown()


def fit_watching(trainer: TorchTrainer, run) -> tuple[str | None, BaseException | None]:
    """`trainer.fit()` in a thread, while this one passes a SIGTERM of the supervisor on to rank 0 (the job's
    preempt flag, which rank 0's heartbeat reads: it checkpoints and requeues). Returns (rank 0's outcome,
    the error the Ray run ended with)."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - reported to the supervisor
            box["error"] = error

    thread = threading.Thread(target=fit, name=f"ray-fit-{run.job_id}", daemon=True)
    thread.start()
    told = False
    while thread.is_alive():
        thread.join(0.5)
        if not told and run.callback.stop_requested.is_set():
            told = True
            log.info("job %s: SIGTERM; asking its gang to checkpoint and requeue", run.job_id)
            retry_transient(lambda: run.store.leases.request_preempt(job_ids=[run.job_id]), run.budget,
                            f"job {run.job_id}: preempt")
    result = box.get("result")
    return (getattr(result, "return_value", None) if result is not None else None), box.get("error")


def settle(run, outcome: str | None, error: BaseException | None) -> str:
    """After the Ray run: rank 0's outcome when it ended the job; else (a rank lost, or a rank failed before
    rank 0 could end it) the supervisor ends it: lost → requeued (a failed attempt, resumed from the last
    checkpoint), a training error on some rank → failed with that rank's message."""
    store, job_id, token = run.store, run.job_id, run.token
    row = retry_transient(lambda: store.get_job(job_id), run.budget, f"job {job_id}: status")
    if row is None or row.lease_token != token or row.status not in ("running", "cancelling"):
        if outcome is not None:
            return outcome
        return row.status if row is not None and row.status in ("succeeded", "failed", "cancelled",
                                                                 "requeued") else "skipped"
    failures = rank_failures(error)
    lost = [rank for rank, failure in failures.items() if is_lost(failure)]
    if error is None or lost or not failures:
        why = (f"rank {lost[0]} of its gang was lost ({first_line(failures[lost[0]])})" if lost
               else f"its gang ended early ({first_line(error) if error else 'no outcome from rank 0'})")
        log.warning("job %s: %s; requeued", job_id, why)
        requeued = retry_transient(
            lambda: store.leases.requeue(job_id, token, f"{why} at step {row.step}; requeued, will resume from its "
                                                        "last checkpoint", preempted=False),
            run.budget, f"job {job_id}: requeue")
        return "requeued" if requeued else "skipped"
    rank, failure = sorted(failures.items())[0]
    return run.failed(RuntimeError(f"training.nodes: rank {rank} failed: {first_line(failure)}"))


def rank_failures(error: BaseException | None) -> dict[int, BaseException]:
    """{rank: its error} from the error a Ray Train run ended with ({-1: error} when it names no rank)."""
    if error is None:
        return {}
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return {int(rank): failure for rank, failure in failures.items()}
    return {-1: error}


def is_lost(error: BaseException) -> bool:
    """A rank's process or node went away (or a collective broke because one did): not the job's fault."""
    seen = 0
    while error is not None and seen < 10:
        names = {type(error).__name__, *(base.__name__ for base in type(error).__mro__)}
        if names & set(LOST) or "Connection closed by peer" in str(error) or "Connection reset" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def give_back(run, shape: GangShape) -> str:
    """The gang can't be placed now: the job goes back to the queue as it was (attempt not counted), marked
    `waiting_for_nodes`; the worker offers it again after ray_retry_seconds (worker/tasks.py)."""
    settings = run.settings
    message = (f"queued; waiting for the Ray cluster to place its gang: {shape.describe()} could not be placed "
               f"within {settings.ray_placement_timeout_seconds:g} s; tried again every "
               f"{settings.ray_retry_seconds:g} s")
    log.info("job %s: %s", run.job_id, message)
    given = retry_transient(lambda: run.store.leases.give_back(run.job_id, run.token, WAITING_FOR_NODES, message),
                            run.budget, f"job {run.job_id}: give back")
    return "waiting" if given else "skipped"
