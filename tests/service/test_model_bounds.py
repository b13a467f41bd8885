"""What checking a job's model may cost the API, and that reading its plan costs no build.

A `model.hf` config of 5,000 one-unit layers used to be accepted after 292 s of API CPU, and
`GET /v1/jobs/{id}/sparsity` of a queued job rebuilt its model at every call. Now the spec's own layer
counts refuse such a model before anything is built; what is built is built in a child process under
a deadline and an address-space limit (api/model_build.py); and the plan measured at submission is
stored with the job (jobs.plan) and served from there. The real app in process on SQLite.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import update

from helpers.service import JOB

TINY_BERT = {"model_type": "bert", "vocab_size": 50, "hidden_size": 2, "num_attention_heads": 1,
             "intermediate_size": 2, "max_position_embeddings": 16}
TOKENS = {"name": "synthetic", "num_samples": 64, "input_shape": [8], "num_classes": 2}


def hf_job(layers: int) -> dict:
    return {"model": {"hf": {**TINY_BERT, "num_hidden_layers": layers}}, "dataset": TOKENS,
            "sparsity": {"method": "rigl", "sparsity": 0.5}, "training": {"epochs": 1, "batch_size": 16}}


@pytest.fixture()
def builds(monkeypatch):
    """Counts the model builds (child processes) the API starts; `builds.forbid()` makes one fail the test."""
    import api.model_build as model_build

    real = model_build.run_bounded
    count = {"n": 0, "forbidden": False}

    def counted(*args, **kwargs):
        assert not count["forbidden"], "the model was built"
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(model_build, "run_bounded", counted)
    model_build._measured.cache_clear()
    count["forbid"] = lambda: count.update(forbidden=True)
    yield count
    model_build._measured.cache_clear()


def _error(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_5000_layer_hf_config_is_refused_before_anything_is_built(api, builds):
    builds["forbid"]()
    error = _error(api.post("/v1/jobs", json=hf_job(5000)))
    assert error["field"] == "model.hf.num_hidden_layers" and "2,000" in error["message"], error
    gpt2 = {**hf_job(1), "model": {"hf": {"model_type": "gpt2", "vocab_size": 50, "n_embd": 2, "n_head": 1,
                                          "n_layer": 20_000}}}
    assert _error(api.post("/v1/jobs", json=gpt2))["field"] == "model.hf.n_layer"
    sweep = api.post("/v1/sweeps", json={"base": hf_job(5000), "grid": {"seed": [0, 1]}})
    assert _error(sweep)["field"] == "base.model.hf.num_hidden_layers"
    planned = api.post("/v1/plan", json={"model": hf_job(5000)["model"], "input_shape": [8], "num_classes": 2})
    assert _error(planned)["field"] == "model.hf.num_hidden_layers"
    assert builds["n"] == 0
    print("\nreliability: model budget: 5,000-layer BERT and 20,000-layer GPT-2 configs (job, sweep, plan) -> "
          "4 refusals (422 naming the layer field), 0 models built")


def test_layer_and_module_caps_follow_the_setting_for_every_kind_of_model(make_api, builds):
    api = make_api(max_model_modules=40)
    deep = {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}] + [{"type": "linear", "out_features": 4}] * 40}
    refused = api.post("/v1/jobs", json={**JOB, "model": {"architecture": deep}})
    assert _error(refused)["field"] == "model.architecture.layers" and builds["n"] == 0  # from the spec alone
    assert _error(api.post("/v1/jobs", json=hf_job(5)))["field"] == "model.hf.num_hidden_layers"
    # a name is a fixed model: counted once built, in the child
    named = api.post("/v1/jobs", json={**JOB, "model": {"name": "resnet18"}, "dataset": {"name": "synthetic",
                                       "num_samples": 64, "input_shape": [3, 32, 32], "num_classes": 10}})
    error = _error(named)
    assert error["field"] == "model.name" and "modules" in error["message"] and builds["n"] == 1
    assert api.post("/v1/jobs", json=JOB).status_code == 201  # the digits MLP: 6 modules


def test_a_build_past_its_deadline_or_memory_is_refused_naming_the_model(make_api, builds):
    from api.errors import ApiError
    from api.model_build import Bounds, run_bounded
    from helpers.hogs import allocate

    api = make_api(max_model_build_seconds=0.001)
    error = _error(api.post("/v1/jobs", json=hf_job(2)))
    assert error == {"code": "model_too_costly", "field": "model", "message": error["message"]}
    assert "RIGL_MAX_MODEL_BUILD_SECONDS" in error["message"]
    assert run_bounded(allocate, (16,), Bounds(100, 60, 256 * 1024**2)) == 16 * 1024**2
    with pytest.raises(ApiError) as refused:
        run_bounded(allocate, (4096,), Bounds(100, 60, 256 * 1024**2))
    assert refused.value.code == "model_too_costly" and refused.value.field == "model"
    assert "RIGL_MAX_MODEL_BUILD_BYTES" in refused.value.message


def _old_route_plan(spec: dict) -> dict:
    """The plan as the sparsity route computed it before plans were stored: built in this process."""
    from rigl_core.data.describe import describe
    from rigl_core.models.registry import build_model, resolve_task
    from rigl_core.sparse.plan import make_plan
    from rigl_core.spec import JobSpec
    from store.spec_version import spec_body

    job = JobSpec.model_validate(spec_body(spec))
    shape = describe(job.dataset)
    input_shape = shape.input_shape if shape else job.model.input_shape
    num_classes = job.model.num_classes or shape.num_classes
    model = build_model(job.model.name, num_classes, input_shape, job.model.hidden_sizes, device="meta",
                        architecture=job.model.architecture, hf=job.model.hf,
                        task=resolve_task(job.training.task, job.model.hf))
    plan = make_plan(model, input_shape, job.sparsity).to_dict()
    return {"layers": plan["layers"], "totals": plan["totals"]}


@pytest.mark.parametrize("body", [JOB, hf_job(3)], ids=["mlp", "hf"])
def test_a_queued_job_s_plan_is_read_not_rebuilt_and_is_the_same_as_before(api, builds, body):
    created = api.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert builds["n"] == 1  # measured once, at submission
    builds["forbid"]()
    for _ in range(3):
        report = api.get(f"/v1/jobs/{job['id']}/sparsity").json()
        assert report["final"] is False
    stored = api.store.get_job(job["id"]).resolved_spec
    expected = json.loads(json.dumps(_old_route_plan(stored)))  # JSON round trip: tuples become lists
    assert {"layers": report["layers"], "totals": report["totals"]} == expected


def test_a_job_stored_without_a_plan_is_measured_once_then_read(api, builds):
    from store.db import Job

    job_id = api.post("/v1/jobs", json=JOB).json()["id"]
    first = api.get(f"/v1/jobs/{job_id}/sparsity").json()
    with api.store.sessions.begin() as s:  # as a job stored before revision 0009
        s.execute(update(Job).where(Job.id == job_id).values(plan=None))
    builds["n"] = 0
    import api.model_build as model_build

    model_build._measured.cache_clear()
    assert api.get(f"/v1/jobs/{job_id}/sparsity").json() == first and builds["n"] == 1
    assert api.store.job_plan(job_id) is not None
    assert api.get(f"/v1/jobs/{job_id}/sparsity").json() == first and builds["n"] == 1
