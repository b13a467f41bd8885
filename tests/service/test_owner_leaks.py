"""What one owner must not learn about another's jobs, through the real API with keys on (SQLite)."""

from __future__ import annotations

import pytest

from helpers.service import JOB


@pytest.fixture()
def secured(make_api):
    from store.keys import create_key

    client = make_api(auth=True)
    keys = {owner: create_key(client.store, owner, admin=owner == "ops")[1] for owner in ("alice", "bob", "ops")}
    client.headers_of = {owner: {"Authorization": f"Bearer {key}"} for owner, key in keys.items()}
    return client


def test_paging_after_another_owners_job_answers_like_a_missing_id(secured):
    alice, bob = secured.headers_of["alice"], secured.headers_of["bob"]
    theirs = secured.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    secured.post("/v1/jobs", json=JOB, headers=bob)
    missing = "job_00000000000000000000"
    foreign = secured.get(f"/v1/jobs?after={theirs}", headers=bob)
    unknown = secured.get(f"/v1/jobs?after={missing}", headers=bob)
    assert foreign.status_code == unknown.status_code == 422
    assert (foreign.json()["error"] | {"message": None}) == (unknown.json()["error"] | {"message": None})
    assert foreign.json()["error"]["message"] == unknown.json()["error"]["message"].replace(missing, theirs)
    assert secured.get(f"/v1/jobs?after={theirs}", headers=alice).status_code == 200  # the owner pages on
    assert secured.get(f"/v1/jobs?after={theirs}", headers=secured.headers_of["ops"]).status_code == 200


def test_only_admins_see_which_worker_holds_a_job(secured):
    alice = secured.headers_of["alice"]
    job_id = secured.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    job, _ = secured.store.claims.claim(job_id, max_attempts=3, worker="gpu-host-7:4242")
    assert job.worker == "gpu-host-7:4242"
    assert secured.get(f"/v1/jobs/{job_id}", headers=alice).json()["worker"] is None
    assert [j["worker"] for j in secured.get("/v1/jobs", headers=alice).json()["data"]] == [None]
    assert secured.post(f"/v1/jobs/{job_id}/cancel", headers=alice).json()["worker"] is None
    ops = secured.headers_of["ops"]
    assert secured.get(f"/v1/jobs/{job_id}", headers=ops).json()["worker"] == "gpu-host-7:4242"
    assert [j["worker"] for j in secured.get("/v1/jobs", headers=ops).json()["data"]] == ["gpu-host-7:4242"]
