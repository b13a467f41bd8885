"""Every number a client sends is bounded: out-of-range values are a 422 naming the field, never a 500.

The walk below is generated from the models themselves (JobSpec and every architecture layer type),
so a numeric field added later without bounds fails here. It runs against the real API on
PostgreSQL, where an unbounded integer overflows a 32-bit column and Infinity is not valid JSON.
"""

from __future__ import annotations

import json
import types
import typing
import uuid

import pytest
from pydantic import BaseModel

from rigl_core.models import architecture as arch_module
from rigl_core.spec import JobSpec
from helpers.service import JOB, postgres_available, temporary_postgres_database
from store.settings import Settings

pytestmark = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")

HUGE_INTS = (10**26, -(10**26), 2**63, 2**64 + 1)
BAD_FLOATS = ("Infinity", "-Infinity", "NaN", "1e309")  # raw JSON: Python's parser reads these as inf/nan


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from api.app import create_app

    root = tmp_path_factory.mktemp("bounds")
    with temporary_postgres_database() as database_url:
        settings = Settings(data_dir=root, database_url=database_url, auth=False, queue=f"q-{uuid.uuid4().hex[:8]}")
        sent: list[str] = []
        with TestClient(create_app(settings, enqueue=sent.append, reaper=False),
                        raise_server_exceptions=False) as client:
            client.sent = sent
            yield client


def _kind(annotation) -> str | None:
    """'int', 'float', 'list[int]', 'list[float]', 'dict[float]', 'model' or None (not numeric)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        numeric = [a for a in args if _kind(a)]
        return _kind(numeric[0]) if numeric else None
    origin = typing.get_origin(annotation)
    if origin is list and args and args[0] in (int, float):
        return f"list[{args[0].__name__}]"
    if origin is dict and len(args) == 2 and args[1] is float:
        return "dict[float]"
    if annotation is bool:
        return None
    if annotation in (int, float):
        return annotation.__name__
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model"
    return None


def _bad_values(kind: str) -> list[str]:
    """Raw JSON texts of out-of-range values for a field of this kind."""
    if kind == "int":
        return [str(v) for v in HUGE_INTS] + ["1e26"]
    if kind == "float":
        return list(BAD_FLOATS)
    if kind == "list[int]":
        return [f"[{v}]" for v in (10**26, 2**31)]
    if kind == "list[float]":
        return ["[Infinity]", "[NaN]"]
    return ['{"fc1": Infinity}', '{"fc1": NaN}']


def spec_fields(model=JobSpec, prefix=()):
    """(dotted path, kind) of every numeric field of the JobSpec, nested models included."""
    for name, field in model.model_fields.items():
        kind = _kind(field.annotation)
        if kind == "model":
            nested = next(a for a in (field.annotation, *typing.get_args(field.annotation))
                          if isinstance(a, type) and issubclass(a, BaseModel))
            if nested is not arch_module.Architecture:
                yield from spec_fields(nested, (*prefix, name))
        elif kind is not None:
            yield ".".join((*prefix, name)), kind


def layer_fields():
    """(layer type, field, kind, a valid layer) for every numeric field of every architecture layer."""
    minimal = {"linear": {"out_features": 4}, "conv1d": {"out_channels": 4, "kernel_size": 1},
               "conv2d": {"out_channels": 4, "kernel_size": 1}, "maxpool": {"kernel_size": 1},
               "avgpool": {"kernel_size": 1}, "residual": {"layers": [{"type": "relu"}]}}
    for cls in typing.get_args(typing.get_args(arch_module.LayerSpec)[0]):
        kind_names = typing.get_args(cls.model_fields["type"].annotation)
        for name, field in cls.model_fields.items():
            kind = _kind(field.annotation)
            if kind in (None, "model") or name == "type":
                continue
            layer_type = kind_names[0]
            yield layer_type, name, kind, {"type": layer_type, **minimal.get(layer_type, {})}


SPEC_FIELDS = sorted(set(spec_fields()))
LAYER_FIELDS = sorted(((t, n, k, json.dumps(layer)) for t, n, k, layer in layer_fields()))


def test_the_walk_covers_the_fields_the_issue_names():
    paths = {path for path, _ in SPEC_FIELDS}
    assert {"training.seed", "training.max_steps", "training.warmup_epochs", "training.lr",
            "sparsity.erk_power_scale", "sparsity.schedule.t_end_steps", "sparsity.schedule.delta_t",
            "dataset.max_samples", "dataset.max_bytes", "dataset.split_seed", "sparsity.layer_density",
            "model.input_shape", "model.hidden_sizes", "training.milestones"} <= paths
    assert ("adaptive-avg-pool", "output_size") in {(t, n) for t, n, _, _ in LAYER_FIELDS}
    assert len(SPEC_FIELDS) >= 35 and len(LAYER_FIELDS) >= 12


def _post_raw(api, text: str):
    return api.post("/v1/jobs", content=text, headers={"content-type": "application/json"})


def _with(tree: dict, path: str, raw: str) -> str:
    """JSON text of `tree` with the value at dotted `path` replaced by the raw JSON `raw`."""
    marker = f"__{uuid.uuid4().hex}__"
    node = tree = json.loads(json.dumps(tree))
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = marker
    return json.dumps(tree).replace(f'"{marker}"', raw)


@pytest.mark.parametrize("path,kind", SPEC_FIELDS)
def test_every_numeric_jobspec_field_is_bounded(api, path, kind):
    sent = len(api.sent)
    for raw in _bad_values(kind):
        response = _post_raw(api, _with(JOB, path, raw))
        assert response.status_code == 422, (path, raw, response.status_code, response.text)
        error = response.json()["error"]
        assert error["field"].startswith(path), (path, raw, error)
    assert len(api.sent) == sent  # nothing was queued


@pytest.mark.parametrize("layer_type,name,kind,layer", LAYER_FIELDS)
def test_every_numeric_architecture_field_is_bounded(api, layer_type, name, kind, layer):
    layers = [json.loads(layer), {"type": "flatten"}, {"type": "linear", "out_features": 10}]
    for raw in _bad_values(kind):
        bad = json.loads(layer)
        bad[name] = "__BAD__"
        body = {**JOB, "model": {"architecture": {"input_shape": [1, 8, 8],
                                                  "layers": [bad, *layers[1:]]}}}
        response = _post_raw(api, json.dumps(body).replace('"__BAD__"', raw))
        assert response.status_code == 422, (layer_type, name, raw, response.status_code, response.text)
        error = response.json()["error"]
        assert error["field"].startswith("model.architecture.layers.0") and name in error["field"], error
        upload = api.post("/v1/architectures", content=json.dumps(
            {"name": "x", "architecture": {"input_shape": [1, 8, 8], "layers": [bad, *layers[1:]]}}
        ).replace('"__BAD__"', raw), headers={"content-type": "application/json"})
        assert upload.status_code == 422 and name in upload.json()["error"]["field"], upload.text


@pytest.mark.parametrize("body,field", [
    # the issue's examples
    ({**JOB, "training": {"seed": 1e26}}, "training.seed"),
    ({**JOB, "model": {"architecture": {"input_shape": [1, 8, 8], "layers": [
        {"type": "adaptive-avg-pool", "output_size": 1e9}, {"type": "flatten"},
        {"type": "linear", "out_features": 10}]}}}, "model.architecture.layers.0.adaptive-avg-pool.output_size"),
    ({**JOB, "training": {"max_steps": 2**31}}, "training.max_steps"),
    ({**JOB, "sparsity": {"schedule": {"t_end_steps": 2**40}}}, "sparsity.schedule.t_end_steps"),
    ({**JOB, "model": {"architecture": {"input_shape": [10**26], "layers": [
        {"type": "linear", "out_features": 10}]}}}, "model.architecture.input_shape"),
])
def test_the_issues_examples_are_422_naming_the_field(api, body, field):
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_total_steps_past_32_bits_is_a_422_not_an_overflow(api):
    """epochs × steps per epoch > 2^31 on PostgreSQL: refused by a field, never stored."""
    body = {**JOB, "dataset": {"name": "synthetic", "num_samples": 5_000_000, "input_shape": [4]},
            "training": {"epochs": 1000, "batch_size": 1}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"].startswith("training"), response.text


def test_event_cursors_are_bounded(api):
    job = api.post("/v1/jobs", json=JOB).json()
    for url in (f"/v1/jobs/{job['id']}/events?after={10**30}", f"/v1/jobs/{job['id']}/events?after={2**31}",
                f"/v1/jobs/{job['id']}/events/stream?after={10**30}"):
        response = api.get(url)
        assert response.status_code == 422 and response.json()["error"]["field"] == "after", (url, response.text)
    response = api.get(f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": str(10**19)})
    assert response.status_code == 422 and response.json()["error"]["field"] == "Last-Event-ID", response.text


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/jobs/job_%00"), ("GET", "/v1/jobs/a%00b/events"), ("GET", "/v1/jobs/a%00b/checkpoint"),
    ("POST", "/v1/jobs/a%00b/cancel"), ("DELETE", "/v1/jobs/a%00b"), ("GET", "/v1/jobs?after=a%00b"),
    ("GET", "/v1/architectures/a%00b"), ("DELETE", "/v1/datasets/a%00b"),
    ("GET", f"/v1/jobs/job_{'0' * 20}%0A"),  # an issued id's shape plus a newline is still not an id
])
def test_ids_that_were_never_issued_are_4xx_not_a_database_error(api, method, path):
    """A NUL byte is an error inside PostgreSQL; ids are checked for the shape the server issues first."""
    response = api.request(method, path)
    assert response.status_code in (404, 422), (path, response.status_code, response.text)
    assert "error" in response.json()
