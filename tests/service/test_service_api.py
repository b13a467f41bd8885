"""The REST API in process against a real SQLite store; jobs are only enqueued (no worker here)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from helpers.service import JOB


@pytest.fixture()
def api(make_api):
    return make_api(reaper=True, max_upload_bytes=200_000, max_body_bytes=50_000)


def error_of(response):
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_every_timestamp_has_an_explicit_utc_offset(api):
    import datetime as dt

    created = api.post("/v1/jobs", json=JOB).json()
    fetched = api.get(f"/v1/jobs/{created['id']}").json()
    listed = api.get("/v1/jobs").json()["data"][0]
    event = api.get(f"/v1/jobs/{created['id']}/events").json()["data"][0]
    stamps = [created["created_at"], fetched["created_at"], listed["created_at"], event["created_at"]]
    assert all(stamp.endswith("+00:00") for stamp in stamps), stamps
    assert len({dt.datetime.fromisoformat(stamp) for stamp in stamps[:3]}) == 1  # the same instant everywhere


def test_the_issue_job_json_is_accepted_as_is(api):
    response = api.post("/v1/jobs", json=JOB)
    assert response.status_code == 201
    job = response.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert job["progress"]["total_steps"] == 2 * 23
    assert api.sent == [job["id"]]
    assert api.get(f"/v1/jobs/{job['id']}").json()["spec"] == JOB
    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events] == ["status"] and events[0]["data"]["status"] == "queued"


@pytest.mark.parametrize(
    "body,status,field",
    [
        ('{"model": {"name": "mlp"}, "dataset": ', 422, "body"),  # malformed JSON
        ({**JOB, "colour": "red"}, 422, "colour"),
        ({**JOB, "model": {"name": "mlp", "widht": 3}}, 422, "model.widht"),
        ({**JOB, "sparsity": {"sparsity": 1.0}}, 422, "sparsity.sparsity"),
        ({**JOB, "training": {"epochs": -3}}, 422, "training.epochs"),
        ({**JOB, "model": {"name": "resnet9000"}}, 422, "model.name"),
        ({**JOB, "model": {"name": "lenet5"}, "dataset": {"name": "mnist1d"}}, 422, "model.name"),
        ({**JOB, "model": {"architecture": {"input_shape": [1, 8, 8], "layers": [
            {"type": "residual", "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3}]},
            {"type": "flatten"}, {"type": "linear", "out_features": 10}]}}}, 422, "model"),
        ({**JOB, "model": {"architecture": {"input_shape": [1, 8, 8], "layers": [
            {"type": "flatten"}, {"type": "linear", "out_features": 7}]}}}, 422, "model.architecture.layers"),
        ({**JOB, "sparsity": {"exclude": ["fc*"]}}, 422, "sparsity"),
        ({**JOB, "sparsity": {"schedule": {"t_end_steps": 10_000}}}, 422, "sparsity.schedule.t_end_steps"),
        ({**JOB, "dataset": {"name": "tensors", "path": "ds_00000000000000000000"}}, 422, "dataset.path"),
        ({**JOB, "dataset": {"name": "cifar10", "data_dir": "/etc"}}, 422, "dataset.data_dir"),
        ({**JOB, "dataset": {"name": "imagefolder", "path": "../../etc"}}, 422, "dataset.path"),
        ({**JOB, "model": {"name": "arch_00000000000000000000"}}, 422, "model.name"),
    ],
)
def test_bad_jobs_get_4xx_naming_the_field(api, body, status, field):
    if isinstance(body, str):
        response = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    else:
        response = api.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["field"] == field, error
    assert error["message"]
    assert api.sent == []  # nothing was queued


def test_unknown_ids_are_404(api):
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/events", "/v1/jobs/job_nope/checkpoint",
                 "/v1/jobs/job_nope/sparsity", "/v1/architectures/arch_x"):
        response = api.get(path)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert api.post("/v1/jobs/job_nope/cancel").status_code == 404


def test_oversized_bodies_are_413(api):
    big = {**JOB, "sparsity": {"include": ["x" * 100] * 1000}}
    response = api.post("/v1/jobs", json=big)
    assert response.status_code == 413 and error_of(response)["field"] == "body"

    def chunks():  # no Content-Length: the cap is on bytes received
        for _ in range(100):
            yield b" " * 1000

    response = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    response = api.post("/v1/datasets?name=big", content=b"\0" * 300_000)
    assert response.status_code == 413


def test_list_pagination_and_status_filter(api):
    ids = [api.post("/v1/jobs", json=JOB).json()["id"] for _ in range(5)]
    page = api.get("/v1/jobs?limit=2").json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    page2 = api.get(f"/v1/jobs?limit=2&after={page['data'][-1]['id']}").json()
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:4]
    last = api.get(f"/v1/jobs?limit=10&after={page2['data'][-1]['id']}").json()
    assert [j["id"] for j in last["data"]] == ids[:1] and not last["has_more"]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = api.get("/v1/jobs?status=cancelled").json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert api.get("/v1/jobs?status=bogus").status_code == 422
    assert api.get("/v1/jobs?after=job_missing").status_code == 422


def test_cancel_a_queued_job_never_starts_it(api, tmp_path):
    from store.jobs import JobStore

    job = api.post("/v1/jobs", json=JOB).json()
    response = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    store = JobStore(f"sqlite:///{tmp_path / 'rigl.db'}")
    claimed, why = store.claims.claim(job["id"], max_attempts=3)
    assert claimed is None and "cancelled" in why


def test_architecture_upload_and_use(api):
    arch = {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 32},
                                                  {"type": "relu"}, {"type": "linear", "out_features": 10}]}
    response = api.post("/v1/architectures", json={"name": "tiny", "architecture": arch})
    assert response.status_code == 201
    arch_id = response.json()["id"]
    assert response.json()["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert api.get(f"/v1/architectures/{arch_id}").json()["name"] == "tiny"
    listing = api.get("/v1/architectures").json()
    assert "wrn-22-2" in listing["builtin"] and listing["data"][0]["id"] == arch_id
    job = api.post("/v1/jobs", json={**JOB, "model": {"name": arch_id}})
    assert job.status_code == 201, job.text
    bad = api.post("/v1/architectures", json={"name": "bad", "architecture": {
        "input_shape": [4], "layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 3}]}})
    assert bad.status_code == 422 and error_of(bad)["field"] == "architecture.layers[0]"


def test_dataset_upload_validation(api):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.standard_normal((100, 8)).astype(np.float32), y=rng.integers(0, 4, 100))
    response = api.post("/v1/datasets?name=toy&format=npz", content=buffer.getvalue())
    assert response.status_code == 201, response.text
    ds = response.json()
    assert ds["num_samples"] == 100 and ds["input_shape"] == [8] and ds["num_classes"] == 4
    job = api.post("/v1/jobs", json={**JOB, "dataset": {"name": "tensors", "path": ds["id"]}})
    assert job.status_code == 201, job.text
    assert job.json()["progress"]["total_steps"] == 2 * 2  # 80 training samples, batch 64
    bad = io.BytesIO()
    np.savez(bad, x=np.zeros((5, 3)), y=np.zeros(4, np.int64))
    response = api.post("/v1/datasets?name=bad", content=bad.getvalue())
    assert response.status_code == 422 and error_of(response)["field"] == "dataset.y"
    response = api.post("/v1/datasets?name=junk", content=b"not a zip")
    assert response.status_code == 422
    assert api.post("/v1/datasets?name=x&format=pickle", content=b"x").status_code == 422
    assert [d["id"] for d in api.get("/v1/datasets").json()["data"]] == [ds["id"]]


def test_plan_endpoint_matches_cli(api):
    response = api.post("/v1/plan", json={"model": {"name": "resnet50"},
                                          "sparsity": {"sparsity": 0.9, "distribution": "erk"}})
    assert response.status_code == 200
    assert abs(response.json()["totals"]["inference_flops_ratio"] - 0.242) < 0.01
    bad = api.post("/v1/plan", json={"model": {"name": "mlp"}, "sparsity": {"distribution": "triangle"}})
    assert bad.status_code == 422 and error_of(bad)["field"] == "sparsity.distribution"


def test_plan_follows_the_dataset_shape(api):
    body = {"model": {"name": "mlp"}, "dataset": {"name": "synthetic", "input_shape": [3, 4, 4], "num_classes": 5}}
    plan = api.post("/v1/plan", json=body).json()
    assert plan["input_shape"] == [3, 4, 4] and plan["num_classes"] == 5
    assert plan["layers"][0]["shape"][1] == 48 and plan["layers"][-1]["shape"][0] == 5
    missing = api.post("/v1/plan", json={"model": {"name": "mlp"}, "dataset": {"name": "tensors", "path": "ds_nope"}})
    assert missing.status_code == 422 and error_of(missing)["field"] == "dataset.path"


def test_claim_event_counts_attempts_from_one(api):
    job = api.post("/v1/jobs", json=JOB).json()
    store = api.app.state.context.store
    claimed, _token = store.claims.claim(job["id"], max_attempts=3, lease_seconds=60, worker="test")
    assert claimed.attempt == 1
    running = [e for e in api.get(f"/v1/jobs/{job['id']}/events").json()["data"] if e["type"] == "status"][-1]
    assert running["message"] == "running (attempt 1)" and running["data"]["attempt"] == 1


def test_dashboard_is_served_from_the_package(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    scripts = re.findall(r'src="([^"]+)"', page.text)
    assert scripts == ["/static/charts.js", "/static/app.js"]
    for asset in [*scripts, "/static/style.css", "/static/favicon.svg"]:
        response = api.get(asset)
        assert response.status_code == 200 and len(response.content) > 100, asset
        # no CDN or other remote fetches: everything the page loads comes from this server
        assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", response.text), asset
    assert api.get("/static/../api/app.py").status_code == 404
    assert "/" not in api.get("/openapi.json").json()["paths"]


def test_the_dashboard_lists_every_method_and_export_format(api):
    """The page's own lists (the New-job form's methods, the jobs filter's, the download buttons) are the
    engine's: a method or export format added to rigl_core shows on the page."""
    from rigl_core.export.formats import EXPORT_FORMATS
    from rigl_core.spec import METHODS

    script = api.get("/static/app.js").text

    def listed(name: str) -> list[str]:
        return json.loads(re.search(rf"^const {name} = (\[[^\]]*\]);", script, re.M).group(1))

    assert sorted(listed("METHODS")) == sorted(METHODS)
    assert listed("EXPORT_KINDS") == list(EXPORT_FORMATS)  # in the order a run writes them


def test_the_new_job_form_starts_from_the_jobspec_defaults_and_the_datasets_length(api):
    """Issue 26 item 2: the form's defaults were ΔT = 100, 10 epochs (one mask update on digits). Its
    DEFAULTS are the JobSpec's own, and epochs come from GET /v1/datasets' suggestion for the dataset."""
    from rigl_core.data.epochs import suggested_epochs
    from rigl_core.spec import JobSpec

    script = api.get("/static/app.js").text
    defaults = json.loads(re.search(r"^const DEFAULTS = (\{[^}]*\});", script, re.M).group(1))
    spec = JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"}})
    jobspec = {"method": spec.sparsity.method, "sparsity": spec.sparsity.sparsity,
               "distribution": spec.sparsity.distribution, "delta_t": spec.sparsity.schedule.delta_t,
               "alpha": spec.sparsity.schedule.alpha, "epochs": spec.training.epochs,
               "batch_size": spec.training.batch_size, "optimizer": spec.training.optimizer, "lr": spec.training.lr}
    assert defaults == jobspec and defaults["delta_t"] == "auto"
    for name in ("sparsity", "alpha", "epochs", "batch_size", "lr"):  # the fields take their value from DEFAULTS
        assert re.search(rf'number\("{name}", String\(DEFAULTS\.{name}\)', script), name
    assert re.search(r'text\("delta_t", \{ value: DEFAULTS\.delta_t', script)
    assert "suggested_epochs" in script  # the form reads the dataset's length from the API

    listed = api.get("/v1/datasets").json()
    assert listed["suggested_epochs"] == {name: suggested_epochs(name) for name in listed["builtin"]}
    assert listed["suggested_epochs"]["digits"] == spec.training.epochs  # the quick start's 20
    assert listed["suggested_epochs"]["mnist1d"] > spec.training.epochs  # a harder set: a longer run


def test_health_and_openapi(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json()["database"] == "ok"
    schema = api.get("/openapi.json").json()
    assert "/v1/jobs/{job_id}/events/stream" in schema["paths"]
    assert json.dumps(schema)


@pytest.fixture()
def secured(make_api):
    from store.keys import create_key

    client = make_api(reaper=True, auth=True, max_active_jobs_per_owner=3)
    keys = {name: create_key(client.store, owner, admin=admin) for name, owner, admin in
            (("alice", "alice", False), ("bob", "bob", False), ("root", "ops", True))}
    client.keys = {name: key for name, (_, key) in keys.items()}
    client.key_ids = {name: row.id for name, (row, _) in keys.items()}
    return client


def as_(client, who):
    return {"Authorization": f"Bearer {client.keys[who]}"}


def test_auth_owner_isolation_admin_and_revocation(secured):
    from store.keys import revoke_key

    assert secured.get("/v1/jobs").status_code == 401
    response = secured.get("/v1/jobs", headers={"Authorization": "Bearer rigl_key_00000000000000000000_" + "x" * 43})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert secured.get("/healthz").status_code == 200  # probes stay open
    job = secured.post("/v1/jobs", json=JOB, headers=as_(secured, "alice")).json()
    assert secured.get(f"/v1/jobs/{job['id']}", headers=as_(secured, "alice")).status_code == 200
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/sparsity",
                 f"/v1/jobs/{job['id']}/checkpoints", f"/v1/jobs/{job['id']}/checkpoint"):
        assert secured.get(path, headers=as_(secured, "bob")).status_code == 404, path
    assert secured.post(f"/v1/jobs/{job['id']}/cancel", headers=as_(secured, "bob")).status_code == 404
    assert secured.get("/v1/jobs", headers=as_(secured, "bob")).json()["data"] == []
    assert [j["id"] for j in secured.get("/v1/jobs", headers=as_(secured, "root")).json()["data"]] == [job["id"]]
    arch = {"input_shape": [4], "layers": [{"type": "linear", "out_features": 2}]}
    arch_id = secured.post("/v1/architectures", json={"name": "a", "architecture": arch},
                           headers=as_(secured, "alice")).json()["id"]
    assert secured.get(f"/v1/architectures/{arch_id}", headers=as_(secured, "bob")).status_code == 404
    revoke_key(secured.store, secured.key_ids["alice"])
    assert secured.get(f"/v1/jobs/{job['id']}", headers=as_(secured, "alice")).status_code == 401


def test_keys_are_stored_as_hashes(secured):
    from store.keys import list_keys

    for row in list_keys(secured.store):
        assert len(row.secret_sha256) == 64
        assert all(row.secret_sha256 not in key for key in secured.keys.values())


def test_idempotency_key(secured):
    headers = {**as_(secured, "alice"), "Idempotency-Key": "run-42"}
    first = secured.post("/v1/jobs", json=JOB, headers=headers)
    again = secured.post("/v1/jobs", json=JOB, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = secured.post("/v1/jobs", json={**JOB, "training": {"epochs": 3}}, headers=headers)
    assert other.status_code == 422 and error_of(other)["field"] == "Idempotency-Key"
    bob = secured.post("/v1/jobs", json=JOB, headers={**as_(secured, "bob"), "Idempotency-Key": "run-42"})
    assert bob.json()["id"] != first.json()["id"]  # keys are per owner
    listed = secured.get("/v1/jobs", headers=as_(secured, "alice")).json()["data"]
    assert len(listed) == 1


def test_concurrent_jobs_per_owner_get_429_with_retry_after(secured):
    for _ in range(3):
        assert secured.post("/v1/jobs", json=JOB, headers=as_(secured, "alice")).status_code == 201
    response = secured.post("/v1/jobs", json=JOB, headers=as_(secured, "alice"))
    assert response.status_code == 429 and response.headers["retry-after"] == "30"
    assert error_of(response)["code"] == "too_many_jobs"
    assert secured.post("/v1/jobs", json=JOB, headers=as_(secured, "bob")).status_code == 201  # per owner


def test_keys_cli(tmp_path, capsys, monkeypatch):
    from rigl_core.cli import main
    from store.jobs import JobStore
    from store.keys import authenticate

    monkeypatch.setenv("RIGL_DATA_DIR", str(tmp_path))
    assert main(["keys", "create", "--owner", "carol", "--name", "laptop"]) == 0
    key = capsys.readouterr().out.strip()
    store = JobStore(f"sqlite:///{tmp_path / 'rigl.db'}")
    principal = authenticate(store, key)
    assert principal.owner == "carol" and not principal.admin
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    secret = key.removeprefix(f"rigl_{principal.key_id}_")  # the secret itself may contain "_"
    assert len(secret) >= 40 and principal.key_id in listing and secret not in listing
    assert main(["keys", "revoke", principal.key_id]) == 0
    assert authenticate(store, key) is None
    assert main(["keys", "revoke", principal.key_id]) == 2
