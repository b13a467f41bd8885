"""Uploaded weights' headers are capped and parsed once (issue 24, item 2).

A 16 MB safetensors header of 240,000 zero-size tensors was accepted, then re-parsed by every job that
named it (4.9 s and +164 MB each time). Now the header's size and tensor count are capped at upload
(RIGL_MAX_WEIGHTS_HEADER_BYTES, RIGL_MAX_WEIGHTS_TENSORS), and what a job's submission needs is stored
with the record: the file is not read again when a job names it. The API in process on SQLite.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save
from sqlalchemy import update

from store.db import WeightsRecord

OCTET = {"Content-Type": "application/octet-stream"}
MODEL = {"name": "mlp", "hidden_sizes": [64, 32]}
JOB = {"model": MODEL, "dataset": {"name": "digits"}, "sparsity": {"method": "rigl", "sparsity": 0.8},
       "training": {"epochs": 1, "max_steps": 2, "batch_size": 64}}


def zero_size_tensors(count: int) -> bytes:
    """A valid safetensors file of `count` empty tensors: all header, no data (the review's file)."""
    header = {f"t{index:06d}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for index in range(count)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw


def mlp_state() -> dict[str, torch.Tensor]:
    from rigl_core.models.registry import build_model

    return build_model("mlp", 10, [1, 8, 8], [64, 32]).state_dict()


def upload(api, data: bytes, name: str = "w"):
    return api.post("/v1/weights", params={"name": name}, content=data, headers=OCTET)


def test_the_reviews_240000_tensor_header_is_refused_from_its_length(api):
    body = zero_size_tensors(240_000)
    assert 13_000_000 < len(body) < 16 << 20  # under the old 16 MiB header limit: it used to be accepted
    start = time.perf_counter()
    response = upload(api, body)
    seconds = time.perf_counter() - start
    assert response.status_code == 422, response.text[:300]
    error = response.json()["error"]
    assert error["field"] == "body" and "over the 4,194,304-byte limit" in error["message"], error
    assert api.get("/v1/weights").json()["data"] == []
    assert list((api.settings.artifact_dir / "weights").iterdir()) == []  # nor a temp file
    print(f"\nreliability: weights header: {len(body) / 1e6:.1f} MB header of 240,000 zero-size tensors -> 422 "
          f"in {seconds:.2f} s (upload included), nothing stored")


def test_more_tensors_than_the_cap_are_refused_before_any_is_checked(api):
    response = upload(api, zero_size_tensors(10_001))  # a 600 KB header: under the size cap
    assert response.status_code == 422, response.text[:300]
    assert "holds 10,001 tensors, over the limit of 10,000" in response.json()["error"]["message"]
    assert upload(api, zero_size_tensors(10_000)).status_code == 201


def test_both_caps_are_settings(make_api):
    api = make_api(max_weights_header_bytes=2048, max_weights_tensors=5)
    state = mlp_state()  # 6 tensors, a header of ~500 bytes
    response = upload(api, save(state))
    assert response.status_code == 422 and "holds 6 tensors, over the limit of 5" in response.json()["error"]["message"]
    long_names = {f"{'x' * 400}{index}": value for index, value in enumerate(list(state.values())[:5])}
    response = upload(api, save(long_names))
    assert response.status_code == 422 and "over the 2,048-byte limit" in response.json()["error"]["message"]


def test_a_job_is_checked_against_the_index_stored_at_upload_not_the_file(api):
    weights = upload(api, save(mlp_state()))
    assert weights.status_code == 201, weights.text
    weights_id = weights.json()["id"]
    index = api.store.uploads.tensor_index(weights_id)
    assert index["fc1.weight"] == ["F32", [64, 64]] and len(index) == 6
    path = api.settings.artifact_dir / "weights" / f"{weights_id}.safetensors"
    path.write_bytes(b"\xff" * 64)  # the file is not read at submission: what it holds now doesn't matter
    response = api.post("/v1/jobs", json={**JOB, "model": {**MODEL, "weights": weights_id}})
    assert response.status_code == 201, response.text
    wrong = api.post("/v1/jobs", json={**JOB, "model": {"name": "mlp", "hidden_sizes": [64, 16], "weights": weights_id}})
    assert wrong.status_code == 422 and "'fc2.weight' has shape [32, 64] but the model's is [16, 64]" in \
        wrong.json()["error"]["message"]


@pytest.mark.parametrize("fits", [True, False])
def test_weights_stored_before_the_index_have_their_header_read_once(make_api, fits):
    """Uploads from before revision 0008 have no index: the first job reads the header (within today's
    caps) and stores it."""
    api = make_api()
    weights_id = upload(api, save(mlp_state()) if fits else zero_size_tensors(20)).json()["id"]
    with api.store.sessions.begin() as s:
        s.execute(update(WeightsRecord).where(WeightsRecord.id == weights_id).values(tensor_index=None))
    if not fits:
        api.app.state.context.settings.max_weights_tensors = 10  # the caps were lowered since the upload
    response = api.post("/v1/jobs", json={**JOB, "model": {**MODEL, "weights": weights_id}})
    if fits:
        assert response.status_code == 201, response.text
        assert api.store.uploads.tensor_index(weights_id)["fc3.bias"] == ["F32", [10]]
    else:
        assert response.status_code == 422 and response.json()["error"]["field"] == "model.weights"
        assert "over the limit of 10" in response.json()["error"]["message"]
        assert api.store.uploads.tensor_index(weights_id) is None
