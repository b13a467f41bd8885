"""Sweeps: grid expansion and bounds, children through the normal submission path and queue, the per-owner
cap (held children released as jobs end), the aggregate table and Pareto frontiers, cancel, delete, owners,
the client, `rigl sweep` and `rigl report SWEEP --png`. The real app on SQLite; enqueue captured."""

from __future__ import annotations

import math

import pytest

from rigl_core.report.pareto import frontier, mean_sd
from helpers.service import JOB
from store.settings import Settings


# ---------------------------------------------------------------------------------------------- pure parts
def test_frontier_keeps_exactly_the_non_dominated_points():
    points = [(0.90, 0.5),   # 0: dominated by 2 (more accurate, cheaper)
              (0.80, 0.1),   # 1: cheapest: on it
              (0.92, 0.3),   # 2: on it
              (0.95, 1.0),   # 3: most accurate: on it
              (0.92, 0.4),   # 4: same accuracy as 2, dearer: dominated
              (0.80, 0.1),   # 5: a twin of 1: kept with it
              (None, 0.05), (0.99, float("nan"))]  # unknown: left out
    assert frontier(points) == [1, 5, 2, 3]
    assert frontier([]) == []
    assert frontier([(0.5, 2.0)]) == [0]
    # equal cost: only the most accurate of them
    assert frontier([(0.7, 1.0), (0.9, 1.0), (0.8, 1.0)]) == [1]


def test_mean_and_sample_sd():
    mean, sd = mean_sd([0.90, 0.94])
    assert mean == pytest.approx(0.92) and sd == pytest.approx(math.sqrt(2 * 0.02**2))
    assert mean_sd([0.5]) == (0.5, None)
    assert mean_sd([]) == (None, None)


def test_expand_applies_each_axis_to_the_base_in_grid_order():
    from store.sweeps import expand

    children = expand(JOB, {"sparsity": [0.5, 0.9], "method": ["rigl", "set"], "seed": [3]})
    assert [params for params, _tree in children] == [
        {"method": "rigl", "sparsity": 0.5, "seed": 3}, {"method": "rigl", "sparsity": 0.9, "seed": 3},
        {"method": "set", "sparsity": 0.5, "seed": 3}, {"method": "set", "sparsity": 0.9, "seed": 3}]
    tree = children[2][1]
    assert tree["sparsity"] == {"method": "set", "sparsity": 0.5, "distribution": "erk"}
    assert tree["training"] == {**JOB["training"], "seed": 3}
    assert JOB["sparsity"]["method"] == "rigl"  # the base is not changed
    # structure is an axis too, after method: srigl and rigl, each unstructured and fan-in
    children = expand(JOB, {"structure": ["unstructured", "fan-in"], "method": ["rigl", "srigl"]})
    assert [params for params, _tree in children] == [
        {"method": method, "structure": structure} for method in ("rigl", "srigl")
        for structure in ("unstructured", "fan-in")]
    assert children[3][1]["sparsity"] == {**JOB["sparsity"], "method": "srigl", "structure": "fan-in"}


# ---------------------------------------------------------------------------------------------- API
@pytest.fixture()
def service(make_api):
    """`service(**settings)` opens an app in process: (client, store, sent ids, settings)."""
    def make(**overrides):
        client = make_api(**overrides)
        return client, client.store, client.sent, client.settings

    return make


def _error(response, status=422) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_bad_grids_are_422s_naming_the_field_and_create_nothing(service):
    api, store, sent, _settings = service(max_sweep_children=6)
    cases = [({"sparsity": [0.5, 1.5]}, "grid.sparsity"),  # the second child is invalid: all or nothing
             ({"method": ["rigl", "bogus"]}, "grid.method"),
             ({"distribution": ["erk", "gaussian"]}, "grid.distribution"),
             ({"structure": ["unstructured", "blocks"]}, "grid.structure"),
             # srigl is fan-in by definition: the srigl + unstructured child names the structure axis
             ({"method": ["rigl", "srigl"], "structure": ["unstructured", "fan-in"]}, "grid.structure"),
             ({"structure": ["fan-in", "fan-in"]}, "grid.structure"),
             ({"seed": list(range(9))}, "grid.seed"),
             ({"sparsity": [0.1 * i for i in range(17)]}, "grid.sparsity"),
             ({"sparsity": [0.5, 0.5]}, "grid.sparsity"),
             ({"sparsity": [0.5, 0.8, 0.9], "seed": [0, 1, 2]}, "grid"),  # 9 > max_sweep_children
             ({}, "grid"),
             ({"epochs": [1, 2]}, "grid.epochs")]
    for grid, field in cases:
        error = _error(api.post("/v1/sweeps", json={"base": JOB, "grid": grid}))
        assert error["field"] == field, (grid, error)
    bad_base = {**JOB, "training": {**JOB["training"], "epochs": 0}}
    assert _error(api.post("/v1/sweeps", json={"base": bad_base, "grid": {"seed": [0]}}))["field"] == \
        "base.training.epochs"
    # the same caps as POST /v1/jobs, through the same path: 10 epochs of batch 8 on digits is 1800 steps
    api2, *_ = service(max_total_steps=1000)
    long_job = {**JOB, "training": {"epochs": 10, "batch_size": 8}}
    error = _error(api2.post("/v1/sweeps", json={"base": long_job, "grid": {"seed": [0, 1]}}))
    assert error["field"] == "base.training.epochs" and "seed=0" in error["message"]
    assert api.get("/v1/jobs").json()["data"] == [] and api.get("/v1/sweeps").json()["data"] == []
    assert sent == []


def test_a_sweep_creates_validated_children_and_enqueues_them(service):
    api, store, sent, _settings = service()
    response = api.post("/v1/sweeps", json={"name": "grid", "base": {**JOB, "tags": ["exp"]},
                                            "grid": {"sparsity": [0.5, 0.9], "method": ["rigl", "set"]}})
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert sweep["status"] == "active" and sweep["progress"]["total"] == 4
    ids = [child["id"] for child in sweep["children"]]
    assert sorted(ids) == sorted(sent) and len(set(ids)) == 4
    jobs = [api.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    assert {(j["spec"]["sparsity"]["method"], j["spec"]["sparsity"]["sparsity"]) for j in jobs} == {
        ("rigl", 0.5), ("rigl", 0.9), ("set", 0.5), ("set", 0.9)}
    assert all(j["status"] == "queued" and j["sweep_id"] == sweep["id"] and j["tags"] == ["exp"] for j in jobs)
    assert jobs[0]["name"].startswith("grid ")
    assert [g["key"] for g in sweep["aggregate"]] == ["rigl/erk/0.5", "rigl/erk/0.9", "set/erk/0.5", "set/erk/0.9"]
    assert sweep["frontier"] == {"flops": [], "size": [], "latency": []}  # nothing finished yet


def test_structure_is_an_axis_and_its_children_are_grouped_apart(service):
    """rigl and srigl, unstructured and fan-in where valid: every child validated as POST /v1/jobs would
    (srigl gets its ablation threshold), and the aggregate keeps structures apart."""
    api, store, sent, _settings = service()
    grid = {"method": ["rigl", "set"], "structure": ["unstructured", "fan-in"]}
    response = api.post("/v1/sweeps", json={"base": JOB, "grid": grid})
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert [(c["params"]["method"], c["params"]["structure"]) for c in sweep["children"]] == [
        ("rigl", "unstructured"), ("rigl", "fan-in"), ("set", "unstructured"), ("set", "fan-in")]
    assert [g["key"] for g in sweep["aggregate"]] == ["rigl/erk/0.9/fan-in", "rigl/erk/0.9",
                                                      "set/erk/0.9/fan-in", "set/erk/0.9"]
    assert {g["structure"] for g in sweep["aggregate"]} == {"unstructured", "fan-in"}
    srigl = api.post("/v1/sweeps", json={"base": JOB, "grid": {"method": ["srigl", "rigl"], "structure": ["fan-in"]}})
    assert srigl.status_code == 201, srigl.text
    specs = [api.get(f"/v1/jobs/{c['id']}").json()["spec"]["sparsity"] for c in srigl.json()["children"]]
    assert [(s["method"], s["structure"]) for s in specs] == [("srigl", "fan-in"), ("rigl", "fan-in")]
    assert len(sent) == 6


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_idempotency_key_replays_the_sweep_and_refuses_another_body(service, database):
    """A retried POST (the client's, after a lost answer) gets the first sweep back, never a second grid;
    racing twins make one sweep. The key is one namespace with jobs' keys and is freed by deleting the sweep."""
    import contextlib

    from helpers.service import postgres_available, temporary_postgres_database

    if database == "postgresql" and not postgres_available():
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432")
    with (temporary_postgres_database() if database == "postgresql" else contextlib.nullcontext(None)) as url:
        _idempotent_sweeps(*service(**({"database_url": url, "auth": False} if url else {})))


def _idempotent_sweeps(api, store, sent, _settings):
    import threading

    body = {"base": JOB, "grid": {"seed": [0, 1]}}
    key = {"Idempotency-Key": "grid-1"}
    answers = []
    barrier = threading.Barrier(4)

    def post():
        barrier.wait()
        answers.append(api.post("/v1/sweeps", json=body, headers=key))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 3
    assert len(api.get("/v1/sweeps").json()["data"]) == 1 and len(sent) == 2  # two children, sent once
    sweep_id = answers[0].json()["id"]

    assert _error(api.post("/v1/sweeps", json={**body, "grid": {"seed": [0, 1, 2]}}, headers=key))["field"] == \
        "Idempotency-Key"
    assert _error(api.post("/v1/jobs", json=JOB, headers=key))["field"] == "Idempotency-Key"
    assert api.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "job-1"}).status_code == 201
    assert _error(api.post("/v1/sweeps", json=body, headers={"Idempotency-Key": "job-1"}))["field"] == \
        "Idempotency-Key"

    assert api.delete(f"/v1/sweeps/{sweep_id}").status_code == 200
    again = api.post("/v1/sweeps", json=body, headers=key)
    assert again.status_code == 201 and again.json()["id"] != sweep_id and "idempotent-replayed" not in again.headers


def _finish(store, job_id: str, accuracy: float | None, flops: float = 0.5, size: int = 1000,
            latency: dict | None = None) -> None:
    """Ends a job as a worker would: result summary (with the report's `inference_latency_ms` when given),
    packed export row, status."""
    if accuracy is None:
        assert store.leases.finish(job_id, None, "failed", "boom", error_code="training_error")
        return
    store.checkpoints.add_checkpoint(job_id, "packed", 10, "model.packed.safetensors", "0" * 64, size)
    result = {"inference_flops_ratio": flops, "final_metrics": {"val_accuracy": accuracy}}
    if latency is not None:
        result["inference_latency_ms"] = latency
    assert store.leases.finish(job_id, None, "succeeded", "succeeded", result=result)


def test_the_owner_cap_holds_children_and_they_are_released_as_jobs_end(service):
    """A sweep queues, it does not fail: cap 2, six children: two active, four held, released one for one."""
    from store.reaper import Reaper

    api, store, sent, _settings = service(max_active_jobs_per_owner=2)
    response = api.post("/v1/sweeps", json={"base": JOB, "grid": {"sparsity": [0.5, 0.8, 0.9], "seed": [0, 1]}})
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert sweep["progress"]["by_status"] == {"queued": 2, "held": 4} and len(sent) == 2
    assert api.post("/v1/jobs", json=JOB).status_code == 429  # the owner's cap is full, as before
    reaper = Reaper(store, sent.append, lease_seconds=120, interval=15, max_active=2)
    assert reaper.run_once() == [] and len(sent) == 2  # nothing ended: nothing released
    finished = 0
    while finished < 6:
        active = [c for c in api.get(f"/v1/sweeps/{sweep['id']}").json()["children"] if c["status"] == "queued"]
        assert len(active) == min(2, 6 - finished) and store.count_active("local") <= 2
        _finish(store, active[0]["id"], 0.9)
        finished += 1
        reaper.run_once()
    state = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert state["status"] == "finished" and state["progress"]["by_status"] == {"succeeded": 6}
    assert len(sent) == 6 and sorted(sent) == sorted(c["id"] for c in state["children"])
    # released in grid order
    assert [c["params"]["sparsity"] for c in state["children"]] == [0.5, 0.5, 0.8, 0.8, 0.9, 0.9]


def test_an_owner_s_unfinished_sweep_children_are_capped(service):
    """Eight sweeps of one owner used to hold 492 children; now held plus queued or running sweep children
    are capped per owner (429 naming the grid, as the active-job cap answers), and freed as they end."""
    api, store, sent, _settings = service(max_active_jobs_per_owner=2, max_sweep_children_per_owner=6)
    first = api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [0, 1, 2, 3]}})
    assert first.status_code == 201 and first.json()["progress"]["by_status"] == {"queued": 2, "held": 2}
    refused = api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [4, 5, 6]}})
    error = _error(refused, 429)
    assert error["code"] == "too_many_sweep_children" and error["field"] == "grid" and "Retry-After" in refused.headers
    assert "4 now" in error["message"] and len(api.get("/v1/sweeps").json()["data"]) == 1  # nothing stored
    assert api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [4, 5]}}).status_code == 201  # 6: fits
    assert api.post("/v1/jobs", json=JOB).status_code == 429  # (the active-job cap, unchanged)
    _finish(store, sent[0], 0.9)  # a finished child frees its place
    assert _error(api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [7, 8]}}), 429)["field"] == "grid"
    assert api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [7]}}).status_code == 201
    api.post(f"/v1/sweeps/{first.json()['id']}/cancel")  # cancelled: held and queued children end
    assert api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [8, 9, 10]}}).status_code == 201


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_concurrent_sweeps_never_pass_the_children_cap(service, database):
    """The cap is counted under the owner's lock row in the creating transaction (as the active-job cap):
    racing sweeps that each pass the early check still can't overshoot it."""
    import contextlib
    import threading

    from helpers.service import postgres_available, temporary_postgres_database
    from store.sweeps import TooManySweepChildren, create_sweep, unfinished_children

    if database == "postgresql" and not postgres_available():
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432")
    with (temporary_postgres_database() if database == "postgresql" else contextlib.nullcontext(None)) as url:
        _api, store, _sent, _settings = service(**({"database_url": url, "auth": False} if url else {}))
        entries = [{"spec": JOB, "resolved": JOB, "total_steps": 10, "params": {}, "name": f"c{i}"} for i in range(3)]
        barrier, outcomes = threading.Barrier(8), []

        def create():
            barrier.wait()
            try:
                create_sweep(store, "alice", None, JOB, {"seed": [0, 1, 2]}, entries, 2, max_children=10)
                outcomes.append("created")
            except TooManySweepChildren:
                outcomes.append("capped")

        threads = [threading.Thread(target=create) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["capped"] * 5 + ["created"] * 3
        with store.sessions() as s:
            assert unfinished_children(s, "alice") == 9
        store.engine.dispose()
    print(f"\nreliability: sweep children cap ({database}): 8 concurrent 3-child sweeps under a cap of 10: "
          f"{outcomes.count('created')} created, {outcomes.count('capped')} refused, 9 children held")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_worker_side_release_is_atomic_under_the_cap(service, database):
    """Two sweeps of one owner and concurrent releases: never more active jobs than the cap."""
    import contextlib
    import threading

    from helpers.service import postgres_available, temporary_postgres_database
    from store.sweeps import release_held

    if database == "postgresql" and not postgres_available():
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432")
    with (temporary_postgres_database() if database == "postgresql" else contextlib.nullcontext(None)) as url:
        _concurrent_release(service, release_held, threading, **({"database_url": url, "auth": False} if url else {}))


def _concurrent_release(service, release_held, threading, **settings):
    api, store, sent, _settings = service(max_active_jobs_per_owner=3, **settings)
    for seeds in ([0, 1, 2, 3], [4, 5, 6, 7]):
        assert api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": seeds}}).status_code == 201
    assert store.count_active("local") == 3
    for job_id in list(sent):
        _finish(store, job_id, 0.9)
    barrier = threading.Barrier(4)

    def release():
        barrier.wait()
        release_held(store, sent.append, 3)

    threads = [threading.Thread(target=release) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.count_active("local") == 3 and len(sent) == 6


def test_aggregate_and_frontiers_match_hand_computed_values(service):
    api, store, sent, _settings = service()
    sweep = api.post("/v1/sweeps", json={"base": JOB, "grid": {"sparsity": [0.5, 0.8, 0.9], "seed": [0, 1]}}).json()
    outcomes = {(0.5, 0): (0.94, 0.5, 1000), (0.5, 1): (0.96, 0.5, 1010),
                (0.8, 0): (0.85, 0.2, 600), (0.8, 1): (None, 0, 0),  # failed: not in the means
                (0.9, 0): (0.93, 0.1, 400), (0.9, 1): (0.91, 0.1, 420)}
    for child in sweep["children"]:
        accuracy, flops, size = outcomes[(child["params"]["sparsity"], child["params"]["seed"])]
        _finish(store, child["id"], accuracy, flops, size)
    state = api.get(f"/v1/sweeps/{sweep['id']}").json()
    groups = {g["sparsity"]: g for g in state["aggregate"]}
    assert groups[0.5]["val_accuracy"]["mean"] == pytest.approx(0.95)
    assert groups[0.5]["val_accuracy"]["sd"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert groups[0.5]["packed_bytes"] == pytest.approx(1005) and groups[0.5]["inference_flops_ratio"] == 0.5
    assert groups[0.8]["val_accuracy"] == {"mean": pytest.approx(0.85), "sd": None}
    assert groups[0.8]["succeeded"] == 1 and groups[0.8]["children"] == 2 and groups[0.8]["seeds"] == [0]
    assert groups[0.9]["val_accuracy"]["mean"] == pytest.approx(0.92) and groups[0.9]["packed_bytes"] == 410
    # flops: 0.9 (0.92 @ 0.1) and 0.5 (0.95 @ 0.5) are on it; 0.8 (0.85 @ 0.2) is dominated by 0.9
    assert state["frontier"]["flops"] == ["rigl/erk/0.9", "rigl/erk/0.5"]
    assert state["frontier"]["size"] == ["rigl/erk/0.9", "rigl/erk/0.5"]
    assert groups[0.8]["on_frontier"] == {"flops": False, "size": False, "latency": False}
    assert state["frontier"]["latency"] == [] and groups[0.5]["latency_ms"] is None  # none measured
    assert state["status"] == "finished" and state["progress"]["fraction"] == 1.0


def test_the_latency_frontier_uses_the_condensed_latency_when_measured(service):
    """Each child's latency_ms is its report's condensed latency when there is one (a fan-in run), else the
    dense one; groups average it over seeds and the latency frontier ranks groups by it."""
    api, store, sent, _settings = service()
    grid = {"method": ["rigl", "srigl"], "structure": ["fan-in"], "sparsity": [0.5, 0.9], "seed": [0, 1]}
    sweep = api.post("/v1/sweeps", json={"base": JOB, "grid": grid}).json()
    # (method, sparsity) -> (accuracy, measured latencies of seed 0 and seed 1)
    outcomes = {("rigl", 0.5): (0.95, [{"dense": 2.0, "condensed": 1.0}, {"dense": 2.0, "condensed": 1.2}]),
                ("rigl", 0.9): (0.90, [{"dense": 2.0, "condensed": 0.5}, {"dense": 2.0, "condensed": 0.7}]),
                ("srigl", 0.5): (0.94, [{"dense": 2.0, "condensed": 1.5}, {"dense": 2.0, "condensed": 1.5}]),
                # not measured (export.latency false): not on any latency frontier
                ("srigl", 0.9): (0.99, [None, None])}
    for child in sweep["children"]:
        p = child["params"]
        accuracy, latencies = outcomes[(p["method"], p["sparsity"])]
        # flops and size rank 0.9 and 0.5 the other way round from latency, so the frontiers differ
        _finish(store, child["id"], accuracy, flops=p["sparsity"], size=int(1000 * p["sparsity"]),
                latency=latencies[p["seed"]])
    state = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert sorted(c["latency_ms"] for c in state["children"] if c["latency_ms"] is not None) == [
        0.5, 0.7, 1.0, 1.2, 1.5, 1.5]
    groups = {g["key"]: g for g in state["aggregate"]}
    assert groups["rigl/erk/0.5/fan-in"]["latency_ms"] == pytest.approx(1.1)
    assert groups["rigl/erk/0.9/fan-in"]["latency_ms"] == pytest.approx(0.6)
    assert groups["srigl/erk/0.9/fan-in"]["latency_ms"] is None
    # rigl 0.9 (0.90 @ 0.6 ms) and rigl 0.5 (0.95 @ 1.1 ms) are on it; srigl 0.5 (0.94 @ 1.5 ms) is dominated
    assert state["frontier"]["latency"] == ["rigl/erk/0.9/fan-in", "rigl/erk/0.5/fan-in"]
    assert groups["srigl/erk/0.5/fan-in"]["on_frontier"]["latency"] is False
    assert state["frontier"]["flops"][-1] == "srigl/erk/0.9/fan-in"  # its FLOPs are known: on that one
    # a report with only the dense latency (an unstructured run) is read as that
    from store.sweeps import latency_ms

    assert latency_ms({"inference_latency_ms": {"dense": 3.0, "condensed": None}}) == 3.0
    assert latency_ms({"inference_latency_ms": {"dense": 3.0}}) == 3.0
    assert latency_ms({"inference_latency_ms": None}) is None and latency_ms({}) is None


def test_cancel_stops_held_and_queued_children_and_delete_removes_everything(service):
    from store.sweeps import release_held

    api, store, sent, _settings = service(max_active_jobs_per_owner=2)
    sweep = api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [0, 1, 2, 3]}}).json()
    first = [c["id"] for c in sweep["children"] if c["id"]]
    _finish(store, first[0], 0.9)
    response = api.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert response.status_code == 202
    state = response.json()
    assert state["status"] == "cancelled"
    assert sorted(c["status"] for c in state["children"]) == ["cancelled", "cancelled", "cancelled", "succeeded"]
    assert api.get(f"/v1/jobs/{first[1]}").json()["status"] == "cancelled"
    assert release_held(store, sent.append, 2) == []  # a cancelled sweep's held children never start
    assert api.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 202  # again: harmless
    response = api.delete(f"/v1/sweeps/{sweep['id']}")
    assert response.status_code == 200 and sorted(response.json()["jobs_deleted"]) == sorted(first)
    assert api.get(f"/v1/sweeps/{sweep['id']}").status_code == 404
    assert all(api.get(f"/v1/jobs/{job_id}").status_code == 404 for job_id in first)
    assert api.delete(f"/v1/sweeps/{sweep['id']}").status_code == 404


def test_a_sweep_with_a_running_child_is_deleted_once_it_stops(service):
    from store.deletion import clean_up

    api, store, sent, settings = service()
    sweep = api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [0, 1]}}).json()
    job, token = store.claims.claim(sent[0], max_attempts=3)
    response = api.delete(f"/v1/sweeps/{sweep['id']}")
    assert response.status_code == 202 and response.json()["jobs_pending_deletion"] == [job.id]
    assert api.get(f"/v1/jobs/{job.id}").json()["status"] == "cancelling"
    assert store.leases.finish(job.id, token, "cancelled", "cancelled")
    from store.artifacts import Artifacts

    clean_up(store, Artifacts.from_settings(settings))
    assert api.get(f"/v1/jobs/{job.id}").status_code == 404


def test_other_owners_get_404(make_api):
    from store.keys import create_key

    api = make_api(auth=True)
    keys = {owner: {"Authorization": f"Bearer {create_key(api.store, owner, admin=owner == 'ops')[1]}"}
            for owner in ("alice", "bob", "ops")}
    sweep = api.post("/v1/sweeps", json={"base": JOB, "grid": {"seed": [0, 1]}}, headers=keys["alice"]).json()
    path = f"/v1/sweeps/{sweep['id']}"
    assert api.get(path, headers=keys["bob"]).status_code == 404
    assert api.post(f"{path}/cancel", headers=keys["bob"]).status_code == 404
    assert api.delete(path, headers=keys["bob"]).status_code == 404
    assert api.get("/v1/sweeps", headers=keys["bob"]).json()["data"] == []
    assert [s["id"] for s in api.get("/v1/sweeps", headers=keys["alice"]).json()["data"]] == [sweep["id"]]
    assert api.get(path, headers=keys["ops"]).status_code == 200  # an admin sees every owner's
    assert api.get(path, headers=keys["alice"]).json()["status"] == "active"
    refused = api.get("/v1/sweeps/sweep_%00", headers=keys["alice"])  # a NUL: refused before any lookup
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "path"


# ---------------------------------------------------------------------------------------------- client, CLI
def _cli_client(monkeypatch, api):
    """`rigl` commands against the in-process app: the real Client, its transport the TestClient."""
    import rigl_core.cli as cli
    from rigl_core.client import Client

    def make():
        client = Client(base_url="http://testserver", retries=0)
        client.http = api
        client.close = lambda: None  # the app's TestClient outlives each command
        return client

    monkeypatch.setattr(cli, "_client", make)


def test_rigl_sweep_wait_and_report_png(service, monkeypatch, tmp_path, capsys):
    import json
    import threading

    from PIL import Image

    from rigl_core.cli import main

    api, store, sent, _settings = service()
    _cli_client(monkeypatch, api)
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"name": "cli", "base": JOB, "grid": {"sparsity": [0.5, 0.9], "seed": [0, 1]}}))
    assert main(["sweep", str(spec)]) == 0
    sweep_id = capsys.readouterr().out.strip()
    assert sweep_id.startswith("sweep_") and len(sent) == 4

    def finish_all():  # a "worker" ending the children (the second sweep's too) while --wait polls
        import time

        deadline = time.monotonic() + 60
        while len(sent) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        for i, job_id in enumerate(sent):
            _finish(store, job_id, 0.9 + 0.01 * i, 0.5 if i < 2 else 0.1, 1000 - 100 * i)

    spec.write_text(json.dumps({"base": JOB, "grid": {"seed": [5]}}))
    timer = threading.Timer(0.3, finish_all)
    timer.start()
    assert main(["sweep", str(spec), "--wait", "--poll", "0.2"]) == 0  # the 5th child ends with the rest
    timer.join()
    out = capsys.readouterr().out
    assert "val_accuracy" in out and "flops" in out
    png = tmp_path / "sweep.png"
    assert main(["report", sweep_id, "--png", str(png)]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 1000
        colours = {colour for _count, colour in image.convert("RGB").getcolors(1_000_000)}
    assert (0xe6, 0x55, 0x0d) in colours  # the frontier line is drawn
    import rigl_core.cli

    client = rigl_core.cli._client()  # the Client, through the same in-process transport
    state = client.sweep(sweep_id)
    assert state["frontier"]["flops"] and client.sweeps()[-1]["id"] == sweep_id


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_two_by_two_sweep_trains_for_real_and_has_a_frontier(service):
    from worker.runner import run_job

    api, store, sent, settings = service(max_active_jobs_per_owner=2)
    base = {**JOB, "training": {"epochs": 1, "batch_size": 128}}
    sweep = api.post("/v1/sweeps", json={"base": base, "grid": {"sparsity": [0.5, 0.9],
                                                                "method": ["rigl", "static"]}}).json()
    from store.sweeps import release_held

    done = 0
    while done < len(sent):
        assert run_job(sent[done], settings, store) == "succeeded"
        done += 1
        release_held(store, sent.append, settings.max_active_jobs_per_owner)  # as the worker task does
    state = api.get(f"/v1/sweeps/{sweep['id']}").json()
    assert state["status"] == "finished" and state["progress"]["by_status"] == {"succeeded": 4}
    assert all(g["packed_bytes"] and g["inference_flops_ratio"] for g in state["aggregate"])
    flops = {g["sparsity"]: g["inference_flops_ratio"] for g in state["aggregate"]}
    assert flops[0.9] < flops[0.5]
    assert state["frontier"]["flops"] and state["frontier"]["size"]
    # export.latency (on by default): each child's measured batch-1 CPU latency reaches the sweep
    assert all(c["latency_ms"] > 0 for c in state["children"]) and state["frontier"]["latency"]


# ---------------------------------------------------------------------------------------------- dashboard
def _browser_missing() -> str | None:
    import shutil

    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None if shutil.which("chromium") else "no chromium on PATH"


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_the_sweep_page_draws_the_frontier_as_children_finish(tmp_path):
    """A real HTTP server (uvicorn in a thread) and headless Chromium: the page polls and the frontier appears."""
    import shutil
    import threading
    import time

    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    from api.app import create_app
    from helpers.service import free_port
    from store.jobs import JobStore

    settings = Settings(data_dir=tmp_path, allowed_hosts="*").resolved()
    sent: list[str] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, enqueue=sent.append, reaper=False), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    store = JobStore(settings.database_url)
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        import httpx

        # the first submission of a fresh server waits for the model checker's fork server to warm up
        sweep = httpx.post(f"{base}/v1/sweeps", json={"name": "live", "base": JOB,
                                                      "grid": {"sparsity": [0.5, 0.9], "seed": [0, 1]}},
                           timeout=120).json()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/#/sweeps")
            expect(page.locator("#sweeps-table")).to_contain_text(sweep["id"])
            page.click(f"text={sweep['id']}")
            expect(page.locator("#sweep-children tbody tr")).to_have_count(4)
            expect(page.locator("#sweep-flops")).to_contain_text("no finished children yet")
            expect(page.locator("#sweep-latency")).to_contain_text("measured latency (batch 1, CPU)")
            for i, job_id in enumerate(sent):  # children end while the page is open
                _finish(store, job_id, 0.9 + 0.01 * i, 0.5 if i < 2 else 0.1, 1000 - 100 * i,
                        {"dense": 2.0 - 0.1 * i, "condensed": None})
            expect(page.locator("#sweep-flops svg polyline.frontier")).to_have_count(1, timeout=15_000)
            expect(page.locator("#sweep-size svg polyline.frontier")).to_have_count(1)
            expect(page.locator("#sweep-latency svg polyline.frontier")).to_have_count(1)
            expect(page.locator("#sweep-latency svg circle.point")).to_have_count(2)
            expect(page.locator("#sweep-flops svg circle.point")).to_have_count(2)
            expect(page.locator("#sweep-aggregate tbody tr")).to_have_count(2)
            expect(page.locator("#sweep-aggregate")).to_contain_text("±")
            browser.close()
        assert errors == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_held_child_whose_dataset_was_deleted_fails_visibly(service):
    """Held children don't pin an upload (only active jobs do); released after it is gone, the child is a
    failed job naming why, never a lost one."""
    import io

    import numpy as np

    from store.sweeps import release_held

    api, store, sent, _settings = service(max_active_jobs_per_owner=1)
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.standard_normal((100, 8)).astype(np.float32), y=rng.integers(0, 4, 100))
    dataset = api.post("/v1/datasets?name=toy&format=npz", content=buffer.getvalue(),
                       headers={"Content-Type": "application/octet-stream"}).json()
    base = {"model": {"name": "mlp"}, "dataset": {"name": "tensors", "path": dataset["id"]},
            "training": {"epochs": 1}}
    sweep = api.post("/v1/sweeps", json={"base": base, "grid": {"seed": [0, 1]}}).json()
    assert sweep["progress"]["by_status"] == {"queued": 1, "held": 1}
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 409  # the queued child uses it
    _finish(store, sent[0], 0.5)
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code in (200, 204)
    (released,) = release_held(store, sent.append, 1)
    job = api.get(f"/v1/jobs/{released}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "upload_gone"
    assert sent == [sweep["children"][0]["id"]]  # a failed child is not sent to a worker
    assert api.get(f"/v1/sweeps/{sweep['id']}").json()["status"] == "finished"


@pytest.mark.slow
def test_rigl_sweep_wait_against_rigl_serve_releases_held_children_from_the_worker(tmp_path):
    """`rigl serve` (API + a real Celery worker), cap 1 and the reaper's interval far away: the second child
    can only start because the worker that finished the first released it."""
    import json
    import os
    import subprocess
    import sys

    import httpx

    from helpers.service import ROOT, embedded_service

    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"base": {**JOB, "training": {"epochs": 1, "batch_size": 128}},
                                "grid": {"sparsity": [0.5, 0.9]}}))
    with embedded_service(tmp_path / "data", log_path=tmp_path / "serve.log", RIGL_MAX_ACTIVE_JOBS_PER_OWNER="1",
                          RIGL_REAPER_INTERVAL_SECONDS="600") as url:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}, "RIGL_API_URL": url}
        done = subprocess.run([sys.executable, "-m", "rigl_core.cli", "sweep", str(spec), "--wait", "--poll", "0.5"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        sweep_id = done.stdout.splitlines()[0]
        assert "held 1" in done.stderr  # it did wait on the cap
        state = httpx.get(f"{url}/v1/sweeps/{sweep_id}").json()
        assert state["progress"]["by_status"] == {"succeeded": 2}
        assert state["frontier"]["flops"] and state["frontier"]["size"]
