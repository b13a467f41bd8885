"""Sweeps that search: `strategy` random (a seeded sample of axes and numeric ranges, reproducible) and
optuna (a study in the job database asked for trials as children finish, poor children pruned from
their per-epoch val_accuracy; the slow test runs it with a real `rigl serve` worker)."""

from __future__ import annotations

import pytest

from helpers.service import JOB

RANDOM = {"base": JOB, "strategy": "random", "trials": 5, "seed": 7, "grid": {"method": ["rigl", "set"]},
          "ranges": {"training.lr": {"low": 1e-3, "high": 0.3, "log": True},
                     "sparsity.schedule.delta_t": {"low": 2, "high": 20}}}


def _points(api, body) -> list[tuple]:
    response = api.post("/v1/sweeps", json=body)
    assert response.status_code == 201, response.text
    return [(c["point"]["method"], c["point"]["training.lr"], c["point"]["sparsity.schedule.delta_t"])
            for c in response.json()["children"]]


def test_a_random_sweep_is_reproducible_from_its_seed(make_api):
    api = make_api()
    first, again, other = _points(api, RANDOM), _points(api, RANDOM), _points(api, {**RANDOM, "seed": 8})
    assert first == again and first != other and len(first) == 5
    assert all(1e-3 <= lr <= 0.3 and 2 <= delta_t <= 20 and isinstance(delta_t, int) for _, lr, delta_t in first)
    assert {method for method, _, _ in first} <= {"rigl", "set"}
    sweep = api.get("/v1/sweeps").json()["data"][0]
    assert sweep["strategy"] == "random" and sweep["trials"] == 5 and sweep["progress"]["total"] == 5
    job = api.get(f"/v1/jobs/{api.sent[-1]}").json()
    assert job["spec"]["training"]["lr"] == other[-1][1]  # the child trains the drawn value


@pytest.mark.parametrize("change, field", [
    ({"strategy": "random"}, "trials"),
    ({"strategy": "grid", "trials": 3}, "trials"),
    ({"strategy": "grid", "ranges": {"training.lr": {"low": 0.1, "high": 0.2}}}, "ranges"),
    ({"strategy": "random", "trials": 2, "ranges": {"training.nope": {"low": 0.1, "high": 0.2}}}, "ranges"),
    ({"strategy": "random", "trials": 2, "ranges": {"training.lr": {"low": 0.2, "high": 0.1}}}, "ranges.training.lr"),
    ({"strategy": "random", "trials": 2, "ranges": {"training.lr": {"low": 0, "high": 1, "log": True}}},
     "ranges.training.lr"),
    ({"strategy": "random", "trials": 2, "grid": {}, "ranges": {}}, "grid"),
    ({"strategy": "random", "trials": 2, "parallel": 2}, "parallel"),
    ({"strategy": "random", "trials": 100}, "trials"),
    ({"strategy": "optuna", "trials": 2, "ranges": {"training.lr": {"low": 1e-3, "high": 200.0}}},
     "ranges.training.lr"),
])
def test_bad_searches_are_422s_naming_the_field(make_api, change, field):
    api = make_api(max_sweep_children=10)
    body = {"base": JOB, "grid": {"sparsity": [0.5, 0.9]}, **change}
    response = api.post("/v1/sweeps", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"].startswith(field), response.json()


def test_an_optuna_sweep_asks_its_first_trials_into_the_job_database_s_own_study(make_api, tmp_path):
    pytest.importorskip("optuna")
    import optuna

    from store.search import optuna_storage

    api = make_api()
    body = {"base": JOB, "strategy": "optuna", "trials": 6, "parallel": 2, "seed": 3,
            "ranges": {"training.lr": {"low": 1e-4, "high": 0.3, "log": True}}}
    response = api.post("/v1/sweeps", json=body)
    assert response.status_code == 201, response.text
    sweep = response.json()
    assert sweep["strategy"] == "optuna" and sweep["progress"]["total"] == 6 and len(sweep["children"]) == 2
    assert [c["trial"] for c in sweep["children"]] == [0, 1] and sorted(api.sent) == sorted(
        c["id"] for c in sweep["children"])
    assert sweep["pruner"] == {"type": "median", "startup_trials": 2, "warmup_evals": 1}
    study = optuna.load_study(study_name=sweep["id"], storage=optuna_storage(api.settings.database_url))
    assert [t.params["training.lr"] for t in study.trials] == [c["point"]["training.lr"] for c in sweep["children"]]
    assert (tmp_path / "rigl.db.optuna.db").exists()  # beside the job database, not in its schema


@pytest.mark.slow
@pytest.mark.serial  # the pruner's cancel races the child's training: one at a time, beside niced tests only (.ci/run)
def test_an_optuna_sweep_run_by_a_real_worker_spends_its_budget_and_prunes_a_poor_child(tmp_path):
    """`rigl serve` (API with the reaper every 0.5 s, one Celery worker): 6 trials over a learning-rate
    range that reaches hopeless values (seed 6 draws 0.11, 0.0066, 0.19, then 1.7e-5, 1.1e-6, 1.7e-5), 2 at a
    time; the median pruner stops the hopeless ones once two trials have finished."""
    pytest.importorskip("optuna")
    import httpx

    from helpers.service import embedded_service, wait_for

    # 300 epochs (~25 s a child on an idle AMD EPYC VM, more elsewhere): a pruned child is still running when
    # its cancel arrives (the pruner acts on reaper passes, the cancel on the next heartbeat). At 60 epochs a
    # child took 5 s on that machine and every hopeless one ended first; one that succeeds is rightly not
    # counted as pruned
    body = {"name": "lr-search", "base": {**JOB, "training": {"epochs": 300, "batch_size": 64}},
            "strategy": "optuna", "trials": 6, "parallel": 2, "seed": 6,
            "ranges": {"training.lr": {"low": 1e-6, "high": 0.5, "log": True}}}
    with embedded_service(tmp_path / "data", log_path=tmp_path / "serve.log",
                          RIGL_REAPER_INTERVAL_SECONDS="0.5") as url:
        created = httpx.post(f"{url}/v1/sweeps", json=body, timeout=60)
        assert created.status_code == 201, created.text
        sweep_id = created.json()["id"]
        seen: list[int] = []

        def finished():  # progress: a child ending restarts nothing, the budget bounds the wait
            state = httpx.get(f"{url}/v1/sweeps/{sweep_id}", timeout=30).json()
            seen.append(state["progress"]["finished"])
            pruned_marked = all(c["status"] != "cancelled" or (c["error"] or {}).get("code") == "pruned"
                                for c in state["children"])
            return state if state["status"] == "finished" and pruned_marked else None

        state = wait_for(finished, 600, interval=1.0, what="the sweep's 6 trials")
        jobs = [httpx.get(f"{url}/v1/jobs/{c['id']}", timeout=30).json() for c in state["children"]]
    assert len(state["children"]) == 6 and sorted(c["trial"] for c in state["children"]) == list(range(6))
    pruned = [c for c in state["children"] if c["pruned"]]
    assert pruned and state["pruned"] == len(pruned)
    assert all(c["status"] == "cancelled" and c["error"]["code"] == "pruned" for c in pruned)
    assert all(c["point"]["training.lr"] < 1e-4 for c in pruned)
    best = state["best"]
    assert best["val_accuracy"] == max(c["val_accuracy"] for c in state["children"] if c["val_accuracy"] is not None)
    assert best["params"]["training.lr"] > 1e-3 and best["val_accuracy"] > 0.8
    by_id = {j["id"]: j for j in jobs}
    assert all(by_id[c["id"]]["spec"]["training"]["lr"] == c["point"]["training.lr"] for c in state["children"])
    assert state["frontier"]["flops"]  # the Pareto front as for a grid


def test_on_postgresql_the_study_lives_in_its_own_schema_and_ours_stays_at_head(make_api):
    """Optuna stamps its own Alembic revision and has no table prefix: in a schema of its own it never
    touches our tables or our `alembic_version`, and a reaper pass (report, tell, ask) works there."""
    pytest.importorskip("optuna")
    from sqlalchemy import create_engine, inspect

    from helpers.service import postgres_available, temporary_postgres_database
    from store.migrations import schema_diff, schema_state
    from store.search import advance_searches

    if not postgres_available():
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432")
    with temporary_postgres_database() as url:
        api = make_api(database_url=url, auth=False)
        body = {"base": JOB, "strategy": "optuna", "trials": 3, "parallel": 1,
                "ranges": {"sparsity.schedule.alpha": {"low": 0.1, "high": 0.5}}}
        sweep = api.post("/v1/sweeps", json=body).json()
        assert len(sweep["children"]) == 1
        first = sweep["children"][0]["id"]
        api.store.request_cancel(first)  # a queued child cancelled: told as failed, and the next trial asked
        advance_searches(api.store, api.sent.append, url, max_active=20)
        sweep = api.get(f"/v1/sweeps/{sweep['id']}").json()
        assert [c["trial"] for c in sweep["children"]] == [0, 1] and api.sent[-1] == sweep["children"][1]["id"]
        engine = create_engine(url)
        try:
            tables = inspect(engine)
            assert "trials" in tables.get_table_names(schema="optuna")
            assert "trials" not in tables.get_table_names() and "version_info" not in tables.get_table_names()
            assert schema_state(engine).at_head and schema_diff(engine) == []
        finally:
            engine.dispose()
