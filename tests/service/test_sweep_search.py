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
