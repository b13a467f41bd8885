"""A long job's events stay bounded: the worker downsamples its metrics events, and GET …/metrics
returns at most `max_points` per series (thinned in the database, first and last kept)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers.service import JOB
from store.settings import Settings


@pytest.fixture()
def api(make_api):
    return make_api(max_metric_points=500)


def test_metrics_of_a_long_job_are_thinned_evenly_and_say_so(api):
    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    api.store.events.add_events(job_id, [{"type": "metrics", "data": {"step": step, "loss": 1.0 / step}}
                                  for step in range(1, 5001)])
    api.store.events.add_events(job_id, [{"type": "eval", "data": {"epoch": e, "val_accuracy": 0.5}} for e in range(3)])
    body = api.get(f"/v1/jobs/{job_id}/metrics").json()
    steps = [point["step"] for point in body["train"]]
    assert len(steps) <= 500 and steps[0] == 1 and steps[-1] == 5000
    gaps = {b - a for a, b in zip(steps, steps[1:-1])}
    assert len(gaps) == 1, gaps  # evenly spaced (the last point is kept wherever it falls)
    assert body["thinned"] is True and body["max_points"] == 500
    assert body["points"]["train"] == {"total": 5000, "returned": len(steps)}
    assert body["points"]["eval"] == {"total": 3, "returned": 3} and len(body["eval"]) == 3

    fewer = api.get(f"/v1/jobs/{job_id}/metrics?max_points=50").json()
    assert len(fewer["train"]) <= 50 and fewer["train"][-1]["step"] == 5000
    more = api.get(f"/v1/jobs/{job_id}/metrics?max_points=100000").json()  # the setting is the ceiling
    assert len(more["train"]) <= 500 and more["max_points"] == 500
    assert api.get(f"/v1/jobs/{job_id}/metrics?max_points=0").status_code == 422


def test_the_worker_emits_a_bounded_number_of_metrics_events():
    from worker.runner import StoreCallback

    settings = Settings(event_every_steps=20, max_metrics_events=2000)
    for total_steps, expected in ((1000, 50), (1_000_000, 2000)):
        callback = SimpleNamespace(settings=settings, pending=[], latest={}, step=None,
                                   meter=SimpleNamespace(on_step=lambda trainer, metrics: None))
        trainer = SimpleNamespace(total_steps=total_steps, step=0)
        for step in range(1, total_steps + 1):
            trainer.step = step
            StoreCallback.on_step(callback, trainer, {"loss": 0.1, "lr": 0.1, "step": step})
        assert len(callback.pending) == expected, (total_steps, len(callback.pending))
