"""A JobSpec sent as YAML, or without a JSON Content-Type (issue 26 item 7): the answer says to send JSON and
that the CLI converts YAML, instead of pydantic's `Input should be a valid dictionary`."""

from __future__ import annotations

import json

import pytest

from helpers.service import JOB

YAML_JOB = "model:\n  name: mlp\ndataset:\n  name: digits\n"
HINT = "send JSON (Content-Type: application/json); the CLI converts YAML"


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/plan", "/v1/sweeps"])
@pytest.mark.parametrize("content_type", ["application/x-yaml", "application/yaml", None])
def test_a_body_that_is_not_sent_as_json_is_told_to_send_json(api, route, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = api.post(route, content=YAML_JOB, headers=headers)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and error["field"] == "Content-Type"
    assert HINT in error["message"] and (content_type or "without a Content-Type") in error["message"]
    # the JSON itself, without the header, is refused the same way: the header is what is missing
    response = api.post(route, content=json.dumps(JOB), headers=headers)
    assert response.status_code == 415 and HINT in response.json()["error"]["message"]


def test_yaml_sent_as_json_is_told_it_is_not_json(api):
    response = api.post("/v1/jobs", content=YAML_JOB, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["field"] == "body" and HINT in error["message"]


def test_json_bodies_are_unaffected(api):
    assert api.post("/v1/jobs", json=JOB).status_code == 201
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = api.post("/v1/jobs", content=json.dumps(JOB), headers={"Content-Type": content_type})
        assert response.status_code == 201, (content_type, response.text)
    response = api.post("/v1/jobs", json=[JOB])  # JSON, but not an object: pydantic's own message stays
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
