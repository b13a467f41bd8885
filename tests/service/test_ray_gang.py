"""Jobs on several nodes, for real: a local Ray cluster of two nodes (one CPU each,
`ray.cluster_utils.Cluster`), PostgreSQL, Redis, the S3 test server, the API in process and a real Celery
worker that supervises each gang (worker/ray_gang.py) through Ray Client (`ray://`), as a worker outside the
Ray cluster does. The ranks are Ray Train workers on gloo; nodes share no folder (each rank caches the bucket
into a temp folder of its own).

- a 2-node × 1-rank job of the digits MLP: its ranks agree bit for bit at the end, and its weights and masks are
  those of the same job on one node with 2 devices (same seed, same global batch);
- a rank killed mid-job: the job is requeued once and resumes from its last checkpoint; nothing lost;
- a gang the cluster cannot place: the job stays queued and holds nothing of the cluster;
- a SIGTERM of the supervising worker: the gang checkpoints, the job requeues, the next worker resumes it;
- a cancel: every rank stops, the cluster is free again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("ray.train", reason="the 'ray' extra (pip install \"rigl-service[ray]\") is not installed")
pytest.importorskip("moto.server", reason="moto's S3 server is not installed")

from helpers.s3 import AWS_ENV, moto_server, new_bucket  # noqa: E402
from helpers.service import (REDIS, ROOT, cleanup_redis_queue, free_port, job_history,  # noqa: E402
                             postgres_available, redis_available, start_worker, stop, temporary_postgres_database,
                             wait_for)
from store.settings import Settings  # noqa: E402

# One worker runs the module, so one Ray cluster (the module fixture): split over two xdist workers, each started a
# cluster and their gangs shared two cores (the SIGTERM and lost-rank tests took 120-170 s there, 65 s alone).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-cluster"),
              pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                                 reason="needs PostgreSQL and Redis (tests/README.md)")]

GANG_JOB = {"model": {"name": "mlp", "hidden_sizes": [64, 32]}, "dataset": {"name": "digits"},
            "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "schedule": {"delta_t": 5}},
            "training": {"epochs": 2, "batch_size": 64, "lr": 0.1, "log_every_steps": 5, "seed": 3,
                         "device": "cpu", "nodes": 2, "devices": 1},
            "export": {"latency": False}}
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def gang_stack(tmp_path_factory):
    """The whole stack for this module: moto, a PostgreSQL database, a Redis queue, a 2-node Ray cluster,
    one Celery worker (the supervisor) and the API in process."""
    from fastapi.testclient import TestClient
    from ray.cluster_utils import Cluster

    from api.app import create_app

    tmp = tmp_path_factory.mktemp("gang")
    queue = f"rigl-gang-{uuid.uuid4().hex[:8]}"
    with moto_server() as endpoint, temporary_postgres_database() as database_url:
        bucket = new_bucket(endpoint)
        saved_path = os.environ.get("PYTHONPATH")  # the Ray nodes' workers import this checkout's code
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), saved_path or ""])
        client_port = free_port()  # the worker reaches the cluster through Ray Client, as in compose and KubeRay
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "ray_client_server_port": client_port})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        common = {"database_url": database_url, "broker_url": REDIS, "queue": queue,
                  "artifact_url": f"s3://{bucket}/artifacts", "s3_endpoint_url": endpoint,
                  "ray_address": f"ray://127.0.0.1:{client_port}", "ray_placement_timeout_seconds": 5,
                  "ray_retry_seconds": 2,
                  "lease_seconds": 20, "cancel_poll_seconds": 0.3, "checkpoint_every_steps": 10,
                  "checkpoint_min_seconds": 0}
        env = {**os.environ, **AWS_ENV, "RIGL_DATA_DIR": str(tmp / "worker"),
               **{f"RIGL_{key.upper()}": str(value) for key, value in common.items()}}
        workers = [start_worker(env, tmp / "worker.log")]
        settings = Settings(data_dir=tmp / "api", auth=False, reaper_interval_seconds=1, **common)
        try:
            with TestClient(create_app(settings)) as api:
                yield SimpleNamespace(api=api, cluster=cluster, endpoint=endpoint, bucket=bucket, tmp=tmp,
                                      worker_log=tmp / "worker.log", workers=workers, env=env)
        finally:
            for worker in workers:
                stop(worker, timeout=60)
            cluster.shutdown()
            if saved_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved_path
            cleanup_redis_queue(queue)


def _finished(api, job_id: str, timeout: float) -> dict:
    def done():
        job = api.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in TERMINAL else None

    return wait_for(done, timeout, interval=1.0, what=f"job {job_id} to finish")


def _one_node_reference(job: dict) -> dict[str, torch.Tensor]:
    """The same job on one node with 2 devices (rank 0 here, rank 1 a child process): its final weights."""
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    tree = {**job, "training": {**job["training"], "nodes": 1, "devices": 2}}
    trainer = Trainer(JobSpec.model_validate(tree))
    report = trainer.fit()
    assert report["replicas_agree"] is True
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


def _dense(api, job_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    response = api.get(f"/v1/jobs/{job_id}/checkpoint?format=dense")
    assert response.status_code == 200, response.text
    return load(response.content)


def _assert_same_weights(exported: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name
        assert torch.equal(exported[name] != 0, tensor != 0), name  # the same masks


def _gang_places(api, job_id: str) -> list[list[dict]]:
    _, _, events = job_history(api, job_id)
    return [e["data"]["ranks"] for e in events if (e["data"] or {}).get("code") == "gang_started"]


def test_a_two_node_job_matches_the_same_job_on_one_node_with_two_devices(gang_stack):
    api = gang_stack.api
    job_id = api.post("/v1/jobs", json=GANG_JOB).json()["id"]
    final = _finished(api, job_id, 600)
    assert final["status"] == "succeeded", (final["error"], gang_stack.worker_log.read_text()[-3000:])
    result = final["result"]
    assert result["nodes"] == 2 and result["devices"] == 2 and result["replicas_agree"] is True
    assert result["steps"] == final["progress"]["total_steps"] and result["leak_check_ok"]
    (places,) = _gang_places(api, job_id)
    assert [p["rank"] for p in places] == [0, 1] and len({p["node"] for p in places}) == 2  # two Ray nodes

    _assert_same_weights(_dense(api, job_id), _one_node_reference(GANG_JOB))
    report = api.get(f"/v1/jobs/{job_id}/sparsity").json()  # the per-layer report, as for any job
    assert report["final"] is True and report["layers"] and report["leak_check"]["ok"]
    statuses, _, events = job_history(api, job_id)
    assert statuses == ["queued", "running", "succeeded"]
    assert any(e["type"] == "mask_update" for e in events) and any(e["type"] == "eval" for e in events)
    print(f"\nray gang: 2 nodes x 1 rank, {result['steps']} steps, replicas agree, equal to 1 node x 2 devices")


def test_a_lost_rank_requeues_the_job_once_and_it_resumes_from_its_checkpoint(gang_stack):
    api = gang_stack.api
    job = {**GANG_JOB, "training": {**GANG_JOB["training"], "epochs": 8}}
    job_id = api.post("/v1/jobs", json=job).json()["id"]

    def training_well_in():
        state = api.get(f"/v1/jobs/{job_id}").json()
        places = _gang_places(api, job_id)
        return places[0] if places and state["progress"]["step"] >= 25 else None

    places = wait_for(training_well_in, 600, interval=0.5, what="the gang to train past a checkpoint")
    victim = next(p for p in places if p["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)  # rank 1's Ray worker process, on the second Ray node

    final = _finished(api, job_id, 600)
    assert final["status"] == "succeeded", (final["error"], gang_stack.worker_log.read_text()[-3000:])
    statuses, resumed, events = job_history(api, job_id)
    assert statuses == ["queued", "running", "requeued", "running", "succeeded"], statuses
    lost = [e["message"] for e in events if e["type"] == "status" and e["data"]["status"] == "requeued"]
    assert "rank" in lost[0] and "lost" in lost[0], lost
    assert len(resumed) == 1 and 0 < resumed[0] < final["progress"]["total_steps"]
    assert final["attempt"] == 2 and final["result"]["steps"] == final["progress"]["total_steps"]
    assert final["result"]["replicas_agree"] is True
    assert len(_gang_places(api, job_id)) == 2  # one gang per attempt
    # resumed bit for bit: nothing lost, nothing trained twice into the weights
    _assert_same_weights(_dense(api, job_id), _one_node_reference(job))
    print(f"\nray gang: rank 1 killed at step >= 25; requeued once, resumed from step {resumed[0]}, succeeded, "
          "weights equal to the uninterrupted one-node run")


def test_a_gang_the_cluster_cannot_place_stays_queued_holding_nothing(gang_stack):
    import ray

    api = gang_stack.api
    job = {**GANG_JOB, "training": {**GANG_JOB["training"], "nodes": 3, "batch_size": 63}}  # 3 nodes; there are 2
    job_id = api.post("/v1/jobs", json=job).json()["id"]

    def waiting():
        state = api.get(f"/v1/jobs/{job_id}").json()
        return state if (state["error"] or {}).get("code") == "waiting_for_nodes" else None

    state = wait_for(waiting, 300, interval=0.5, what="the job to wait for nodes")
    assert state["status"] == "queued" and state["attempt"] == 0, state
    assert "3 ranks" in state["error"]["message"]
    ray.init(address=gang_stack.cluster.address, logging_level="ERROR")
    try:
        time.sleep(0.5)
        held = [pg for pg in ray.util.placement_group_table().values() if pg["state"] in ("CREATED", "RESCHEDULING")]
        assert held == [] and ray.available_resources().get("CPU") == 2.0
    finally:
        ray.shutdown()
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    final = _finished(api, job_id, 120)
    assert final["status"] == "cancelled" and final["attempt"] == 0


def _training(api, job_id: str, past: int):
    def well_in():
        state = api.get(f"/v1/jobs/{job_id}").json()
        return state if _gang_places(api, job_id) and state["progress"]["step"] >= past else None

    return wait_for(well_in, 600, interval=0.5, what=f"the gang to train past step {past}")


def test_sigterm_of_the_supervisor_checkpoints_the_gang_and_the_next_worker_resumes_it(gang_stack):
    """A worker's warm shutdown: rank 0 (on the Ray cluster) checkpoints and requeues, the supervisor exits, and
    the next worker's gang resumes from that checkpoint."""
    api = gang_stack.api
    job = {**GANG_JOB, "training": {**GANG_JOB["training"], "epochs": 4}}
    job_id = api.post("/v1/jobs", json=job).json()["id"]
    _training(api, job_id, 15)
    first = gang_stack.workers[0]
    first.send_signal(signal.SIGTERM)  # the Celery worker's warm shutdown
    first.wait(timeout=120)
    statuses, _, _ = job_history(api, job_id)
    assert statuses[-1] == "requeued", statuses
    gang_stack.workers[0] = start_worker(gang_stack.env, gang_stack.tmp / "worker.log")
    final = _finished(api, job_id, 600)
    assert final["status"] == "succeeded", final["error"]
    statuses, resumed, _ = job_history(api, job_id)
    assert statuses == ["queued", "running", "requeued", "running", "succeeded"], statuses
    assert len(resumed) == 1 and resumed[0] >= 15 and final["attempt"] == 2
    _assert_same_weights(_dense(api, job_id), _one_node_reference(job))


def test_cancelling_a_gang_stops_every_rank(gang_stack):
    import ray

    api = gang_stack.api
    job = {**GANG_JOB, "training": {**GANG_JOB["training"], "epochs": 20}}
    job_id = api.post("/v1/jobs", json=job).json()["id"]
    _training(api, job_id, 10)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    final = _finished(api, job_id, 300)
    assert final["status"] == "cancelled" and final["progress"]["step"] < final["progress"]["total_steps"]
    ray.init(address=gang_stack.cluster.address, logging_level="ERROR")
    try:  # the gang is gone: both CPUs free again, no placement group held
        wait_for(lambda: ray.available_resources().get("CPU") == 2.0, 60, what="the gang's CPUs back")
        held = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        assert held == []
    finally:
        ray.shutdown()
