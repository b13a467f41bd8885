"""A server installed without an optional package (issue 26 item 1): every route that needs it answers a
JSON 501 naming the extra to install, never a bare `Internal Server Error`; `[service]` brings the
extras a service's own features need (timm and Hugging Face models, ONNX export)."""

from __future__ import annotations

import re
import sys
import tomllib

import pytest

from helpers.service import JOB, ROOT

TIMM_JOB = {**JOB, "model": {"name": "timm/resnet18"}}
HF_JOB = {**JOB, "model": {"hf": {"model_type": "bert", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32}},
          "dataset": {"name": "synthetic", "input_shape": [8], "num_classes": 2}}


@pytest.fixture()
def without(monkeypatch):
    """without("timm", ...): those packages look uninstalled to `import` (what an absent package is)."""
    def hide(*names: str) -> None:
        for name in names:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)

    return hide


def _names_the_extra(response, extra: str) -> dict:
    assert response.status_code == 501, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "missing_extra" and error["extra"] == extra, error
    assert f"needs the '{extra}' extra" in error["message"] and f'rigl-service[{extra}]' in error["message"], error
    return error


def test_timm_models_without_the_models_extra_answer_json_naming_it(api, without):
    without("timm")
    _names_the_extra(api.post("/v1/jobs", json=TIMM_JOB), "models")
    _names_the_extra(api.post("/v1/jobs", json={**TIMM_JOB, "model": {"name": "timm/notamodel"}}), "models")
    _names_the_extra(api.post("/v1/plan", json={"model": {"name": "timm/resnet18"}, "input_shape": [3, 32, 32],
                                                "num_classes": 10}), "models")
    _names_the_extra(api.post("/v1/sweeps", json={"base": TIMM_JOB, "grid": {"sparsity.sparsity": [0.8, 0.9]}}),
                     "models")
    assert api.sent == [] and api.get("/v1/jobs").json()["data"] == []  # nothing was accepted


def test_hugging_face_models_without_the_models_extra_answer_json_naming_it(api, without):
    without("transformers")
    _names_the_extra(api.post("/v1/jobs", json=HF_JOB), "models")
    _names_the_extra(api.post("/v1/plan", json={"model": HF_JOB["model"], "input_shape": [8], "num_classes": 2}),
                     "models")


def test_the_same_requests_work_with_the_extra_installed(api):
    """The control: what the tests above refuse is a valid request once the package is there."""
    pytest.importorskip("timm")
    assert api.post("/v1/plan", json={"model": {"name": "timm/resnet18"}, "input_shape": [3, 32, 32],
                                      "num_classes": 10}).status_code == 200
    response = api.post("/v1/jobs", json={**TIMM_JOB, "model": {"name": "timm/notamodel"}})
    assert response.status_code == 422 and response.json()["error"]["field"] == "model.name"


def test_the_service_extra_brings_models_and_onnx():
    """README's one install line is `.[service]`: a service that accepts timm/HF names and lists
    model.onnx among a job's outputs must be able to build and write them."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (self_reference,) = [r for r in extras["service"] if r.startswith("rigl-service[")]
    included = set(re.search(r"\[(.*)\]", self_reference).group(1).split(","))
    assert {"models", "onnx", "datasets", "report", "client"} <= included, included
