"""What one owner may have and what one job may cost.

The per-owner active-job cap is enforced inside the creating transaction (a per-owner lock row),
so concurrent submissions can't overshoot it: measured against a real API server process on
PostgreSQL. Cost caps (total steps, training FLOPs, synthetic values) are 422s naming the field.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import httpx
import pytest

from helpers.service import (JOB, REDIS, ROOT, cleanup_redis_queue, free_port, postgres_available, redis_available,
                             stop, temporary_postgres_database, wait_ready)


# ---------------------------------------------------------------------------------------------- atomic cap
def _concurrent_posts(url: str, count: int, job: dict) -> list[int]:
    """`count` POSTs released together by a barrier, one connection each."""
    barrier, codes = threading.Barrier(count), []

    def post():
        with httpx.Client(base_url=url, timeout=60) as client:
            barrier.wait()
            codes.append(client.post("/v1/jobs", json=job).status_code)

    threads = [threading.Thread(target=post) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


@pytest.mark.slow
@pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"),
                    reason="needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379")
def test_forty_concurrent_submissions_with_a_cap_of_twenty_accept_exactly_twenty(tmp_path):
    """A real API server (two uvicorn worker processes) on PostgreSQL; three rounds of 40 at once."""
    queue = f"rigl-cap-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with temporary_postgres_database() as database_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
        env.update(RIGL_DATA_DIR=str(tmp_path), RIGL_DATABASE_URL=database_url, RIGL_BROKER_URL=REDIS,
                   RIGL_QUEUE=queue, RIGL_AUTH="false", RIGL_MAX_ACTIVE_JOBS_PER_OWNER="20")
        log = open(tmp_path / "api.log", "ab")
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "warning"],
                                  env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, 120, server, what="the API server")
            accepted = []
            for _ in range(3):
                codes = _concurrent_posts(url, 40, JOB)
                assert sorted(set(codes)) == [201, 429], codes
                accepted.append(codes.count(201))
                jobs = httpx.get(f"{url}/v1/jobs?limit=100&status=queued").json()["data"]
                assert len(jobs) == 20
                for job in jobs:  # queued jobs cancel at once: the next round starts from zero
                    assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel").status_code == 202
            print(f"\nreliability: submission cap: 40 concurrent submissions to a real server on PostgreSQL, cap 20: "
                  f"accepted {accepted} in 3 rounds (the rest 429)")
            assert accepted == [20, 20, 20]
        finally:
            stop(server)
            log.close()
            cleanup_redis_queue(queue)


def test_the_cap_holds_under_concurrent_creates_on_sqlite(tmp_path):
    """The store itself, 24 threads at once on one SQLite file: exactly the cap, no 'database is locked'."""
    from store.jobs import JobStore, TooManyActiveJobs

    store = JobStore(f"sqlite:///{tmp_path / 'cap.db'}")
    barrier, outcomes = threading.Barrier(24), []

    def create():
        barrier.wait()
        try:
            store.create_job(JOB, JOB, 10, owner="alice", max_active=5)
            outcomes.append("created")
        except TooManyActiveJobs:
            outcomes.append("capped")

    threads = [threading.Thread(target=create) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["capped"] * 19 + ["created"] * 5
    assert store.count_active("alice") == 5
    store.create_job(JOB, JOB, 10, owner="bob", max_active=5)  # per owner


def test_an_idempotent_replay_is_not_refused_by_the_cap(make_api):
    api = make_api(max_active_jobs_per_owner=1)
    first = api.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k1"})
    again = api.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    assert api.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k2"}).status_code == 429


# ---------------------------------------------------------------------------------------------- cost caps

def _job(**training) -> dict:
    return {**JOB, "training": {**JOB["training"], **training}}


def _error(response, status=422) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_total_steps_over_the_cap_or_int32_is_a_422_naming_the_field(make_api):
    client = make_api(max_total_steps=1000)
    # digits: 1438 training samples; 10 epochs of batch 8 = 1800 steps
    assert _error(client.post("/v1/jobs", json=_job(epochs=10, batch_size=8)))["field"] == "training.epochs"
    error = _error(client.post("/v1/jobs", json=_job(epochs=10, batch_size=8, max_steps=5000)))
    assert error["field"] == "training.max_steps" and "1,000" in error["message"]
    assert client.post("/v1/jobs", json=_job(epochs=10, batch_size=8, max_steps=900)).status_code == 201
    assert client.post("/v1/jobs", json=_job(epochs=5, batch_size=8)).status_code == 201
    client = make_api()  # the default cap keeps total_steps far inside the int32 column
    huge = {"model": {"name": "mlp", "hidden_sizes": [8]},
            "dataset": {"name": "synthetic", "num_samples": 5_000_000, "input_shape": [4]},
            "training": {"epochs": 10_000, "batch_size": 1}}  # 4·10^10 steps: over 2^31
    assert _error(client.post("/v1/jobs", json=huge))["field"] == "training.epochs"
    huge["training"]["max_steps"] = 2**31 + 5
    assert _error(client.post("/v1/jobs", json=huge))["field"] == "training.max_steps"


def test_training_flops_over_the_cap_is_a_422(make_api):
    from rigl_core.data.describe import describe
    from rigl_core.models.registry import build_model
    from rigl_core.sparse.plan import make_plan
    from rigl_core.spec import JobSpec

    spec = JobSpec.model_validate(JOB)
    shape = describe(spec.dataset)
    model = build_model("mlp", 10, shape.input_shape, None, device="meta")
    steps = spec.training.epochs * -(-shape.num_train // spec.training.batch_size)
    plan = make_plan(model, shape.input_shape, spec.sparsity, total_steps=steps)  # the run's T_end and ΔT
    unknown_length = make_plan(model, shape.input_shape, spec.sparsity)
    assert plan.training_flops_ratio() > unknown_length.training_flops_ratio()  # 46 steps: ΔT 3, not 100
    per_example = 3 * sum(lp.flops_dense for lp in plan.layers) * plan.training_flops_ratio()
    examples = steps * spec.training.batch_size
    estimate = per_example * examples
    client = make_api(max_training_flops=estimate * 0.995)
    error = _error(client.post("/v1/jobs", json=JOB))
    assert error["field"] == "training" and "FLOPs" in error["message"]
    client = make_api(max_training_flops=estimate * 1.005)
    assert client.post("/v1/jobs", json=JOB).status_code == 201


def test_synthetic_values_over_the_setting_is_a_422_naming_num_samples(make_api):
    job = {"model": {"name": "mlp"}, "dataset": {"name": "synthetic", "num_samples": 2048, "input_shape": [3, 32, 32]},
           "training": {"epochs": 1}}
    client = make_api(max_synthetic_values=1_000_000)
    error = _error(client.post("/v1/jobs", json=job))
    assert error["field"] == "dataset.num_samples" and "1,000,000" in error["message"]
    job["dataset"]["num_samples"] = 256  # 786,432 values
    assert client.post("/v1/jobs", json=job).status_code == 201
