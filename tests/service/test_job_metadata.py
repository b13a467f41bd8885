"""Job name, tags and metadata: bounded at submit (422 naming the field), returned everywhere a job is,
kept out of the spec, and the list filters (status, tag, name prefix, method) with pagination, on a real
SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from helpers.service import JOB, postgres_available, temporary_postgres_database
from store.db import JobTag
from store.settings import Settings

needs_pg = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")


@pytest.fixture()
def sqlite_api(make_api):
    """For input checks, which are the same whatever the database."""
    return make_api()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def api(request, make_api, tmp_path):
    if request.param == "sqlite":
        yield make_api()
        return
    from api.app import create_app

    # Local on PostgreSQL: the app must be closed and its engine disposed before the database is dropped.
    with temporary_postgres_database() as url:
        settings = Settings(data_dir=tmp_path, database_url=url, auth=False, max_active_jobs_per_owner=100)
        with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as client:
            yield client
            client.app.state.context.store.engine.dispose()


def submit(api, method: str = "rigl", **labels) -> dict:
    response = api.post("/v1/jobs", json={**JOB, "sparsity": {**JOB["sparsity"], "method": method}, **labels})
    assert response.status_code == 201, response.json()
    return response.json()


def ids(api, query: str) -> list[str]:
    response = api.get(f"/v1/jobs?{query}")
    assert response.status_code == 200, response.json()
    return [job["id"] for job in response.json()["data"]]


def test_labels_are_returned_everywhere_and_kept_out_of_the_spec(api):
    metadata = {"git": "abc123", "lr_sweep": [0.1, 0.2], "nested": {"ok": True, "n": None}}
    job = submit(api, name="ResNet sweep #3", tags=["sweep", "exp:7", "sweep"], metadata=metadata)
    assert (job["name"], job["tags"], job["metadata"]) == ("ResNet sweep #3", ["sweep", "exp:7"], metadata)
    fetched = api.get(f"/v1/jobs/{job['id']}").json()
    listed = api.get("/v1/jobs").json()["data"][0]
    for view in (fetched, listed):
        assert (view["name"], view["tags"], view["metadata"], view["method"]) == (
            "ResNet sweep #3", ["sweep", "exp:7"], metadata, "rigl")
        assert view["spec"] == {**JOB, "sparsity": {**JOB["sparsity"], "method": "rigl"}}  # no labels inside
    plain = submit(api)
    assert (plain["name"], plain["tags"], plain["metadata"]) == (None, [], {})


LONG_METADATA = {"blob": "x" * (16 * 1024)}


@pytest.mark.parametrize("labels,field", [
    ({"name": "n" * 201}, "name"),
    ({"name": ""}, "name"),
    ({"name": "line\nbreak"}, "name"),
    ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
    ({"tags": ["ok", "Upper"]}, "tags.1"),
    ({"tags": ["has space"]}, "tags.0"),
    ({"tags": ["x" * 65]}, "tags.0"),
    ({"tags": "sweep"}, "tags"),
    ({"metadata": {f"k{i}": i for i in range(65)}}, "metadata"),
    ({"metadata": LONG_METADATA}, "metadata"),
    ({"metadata": ["not", "an", "object"]}, "metadata"),
])
def test_bad_labels_are_422_naming_the_field(sqlite_api, labels, field):
    response = sqlite_api.post("/v1/jobs", json={**JOB, **labels})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field, response.json()
    assert sqlite_api.get("/v1/jobs").json()["data"] == []  # nothing stored


def test_non_finite_metadata_is_refused(sqlite_api):
    body = b'{"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "metadata": {"loss": NaN}}'
    response = sqlite_api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "metadata"


def test_metadata_at_its_bounds_is_accepted(api):
    metadata = {f"k{i:02d}": "v" * 200 for i in range(64)}  # 64 keys, about 13.6 KiB compact
    assert submit(api, metadata=metadata, tags=[f"t{i}" for i in range(20)], name="n" * 200)["metadata"] == metadata


def test_list_filters_combine_and_page(api):
    a = submit(api, "rigl", name="resnet-a", tags=["sweep", "gpu"])
    b = submit(api, "set", name="resnet-b", tags=["sweep"])
    c = submit(api, "rigl", name="ResNet-c", tags=["gpu"])
    d = submit(api, "rigl", name="mlp_%", tags=["sweep"])
    e = submit(api, "static")
    api.post(f"/v1/jobs/{b['id']}/cancel")  # queued -> cancelled at once
    newest_first = lambda *jobs: [j["id"] for j in sorted(jobs, key=lambda j: j["created_at"])][::-1]  # noqa: E731

    assert ids(api, "tag=sweep") == newest_first(a, b, d)
    assert ids(api, "tag=gpu") == newest_first(a, c)
    assert ids(api, "tag=none-such") == []
    assert ids(api, "name_prefix=resnet") == newest_first(a, b)  # case-sensitive on both databases
    assert ids(api, "name_prefix=ResNet") == [c["id"]]
    assert ids(api, "name_prefix=mlp_%25") == [d["id"]]  # LIKE wildcards are plain characters
    assert ids(api, "name_prefix=mlp%25") == []
    assert ids(api, "method=rigl") == newest_first(a, c, d)
    assert ids(api, "method=static") == [e["id"]]
    assert ids(api, "status=cancelled") == [b["id"]]
    assert ids(api, "status=queued&tag=sweep") == newest_first(a, d)
    assert ids(api, "tag=sweep&method=rigl&name_prefix=res") == [a["id"]]

    pages, after = [], None  # pagination walks the filtered list
    while True:
        page = api.get("/v1/jobs?tag=sweep&limit=1" + (f"&after={after}" if after else "")).json()
        pages += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        after = pages[-1]
    assert pages == newest_first(a, b, d)


@pytest.mark.parametrize("query,field", [("tag=Not%20A%20Tag", "tag"), ("method=magic", "method"),
                                         ("name_prefix=", "name_prefix"), ("name_prefix=" + "n" * 201, "name_prefix")])
def test_bad_filters_are_422_naming_the_field(sqlite_api, query, field):
    response = sqlite_api.get(f"/v1/jobs?{query}")
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.json()


def test_idempotent_replay_includes_the_labels(api):
    headers = {"Idempotency-Key": "k1"}
    body = {**JOB, "name": "once", "tags": ["a"]}
    first = api.post("/v1/jobs", json=body, headers=headers).json()
    replay = api.post("/v1/jobs", json=body, headers=headers)
    assert replay.headers.get("Idempotent-Replayed") == "true" and replay.json()["id"] == first["id"]
    other = api.post("/v1/jobs", json={**body, "tags": ["b"]}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_mismatch"


def test_deleting_a_job_removes_its_tags(api):
    job = submit(api, tags=["temp", "x"])
    store = api.app.state.context.store
    count = lambda: store.sessions().execute(select(func.count()).select_from(JobTag)).scalar_one()  # noqa: E731
    assert count() == 2
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 200  # a queued job goes at once
    assert count() == 0 and ids(api, "tag=temp") == []


def test_tag_filter_never_crosses_owners(tmp_path):
    from store.jobs import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'owners.db'}")
    spec = {**JOB, "sparsity": {**JOB["sparsity"]}}
    mine = store.create_job(spec, spec, 10, owner="alice", tags=["shared"])
    store.create_job(spec, spec, 10, owner="bob", tags=["shared"])
    assert [j.id for j in store.list_jobs(owner="alice", tag="shared")[0]] == [mine.id]
    assert len(store.list_jobs(owner=None, tag="shared")[0]) == 2  # an admin sees both


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`rigl serve --no-worker` (embedded, keys off): submitted jobs stay queued."""
    from helpers.service import serve_process

    with serve_process(tmp_path_factory.mktemp("labels") / "data", args=("--no-worker",)) as (base, _process):
        yield base


@pytest.mark.slow
@pytest.mark.browser
def test_dashboard_shows_and_filters_labels(served):
    """Chromium on `rigl serve`: names and tags in the list, the filters narrow it and stay in the URL, a
    tag chip filters by its tag, the job page shows the labels."""
    import os
    import shutil

    import httpx

    chromium = os.environ.get("RIGL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        chromium = None
    if not chromium:
        if os.environ.get("RIGL_REQUIRE_BROWSER") == "1":
            pytest.fail("RIGL_REQUIRE_BROWSER=1 but no playwright or chromium")
        pytest.skip("no playwright or chromium")
    base = served

    def post(method, **labels):
        body = {**JOB, "sparsity": {**JOB["sparsity"], "method": method}, **labels}
        return httpx.post(f"{base}/v1/jobs", json=body, timeout=30).json()["id"]

    sweep = post("rigl", name="resnet sweep", tags=["sweep", "gpu"], metadata={"commit": "abc123"})
    other = post("set", name="mlp baseline", tags=["baseline"])
    unnamed = post("static")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        rows = page.locator("#jobs-table tbody tr")
        page.goto(f"{base}/#/")
        expect(rows).to_have_count(3)
        expect(page.locator(f'tr[data-job="{sweep}"] .job-name')).to_contain_text("resnet sweep")
        expect(page.locator(f'tr[data-job="{sweep}"] .tag')).to_have_text(["sweep", "gpu"])

        page.fill("#filter-name", "mlp")
        expect(rows).to_have_count(1)
        expect(page.locator(f'tr[data-job="{other}"]')).to_have_count(1)
        assert "name_prefix=mlp" in page.url
        page.click("#filter-clear")
        expect(rows).to_have_count(3)
        page.select_option("#filter-method", "static")
        expect(rows).to_have_count(1)
        expect(page.locator(f'tr[data-job="{unnamed}"]')).to_have_count(1)
        page.fill("#filter-name", "resnet")  # combined with method=static: nothing
        expect(page.locator("#jobs-table")).to_contain_text("No jobs match these filters")
        page.click("#filter-clear")
        page.locator(f'tr[data-job="{sweep}"] .tag', has_text="gpu").click()  # a chip filters by its tag
        expect(rows).to_have_count(1)
        expect(page.locator("#filter-tag")).to_have_value("gpu")

        page.reload()  # the filters live in the URL
        expect(page.locator("#filter-tag")).to_have_value("gpu")
        expect(rows).to_have_count(1)

        page.goto(f"{base}/#/jobs/{sweep}")
        summary = page.locator("#job-summary")
        expect(summary).to_contain_text("resnet sweep")
        expect(summary.locator(".tag")).to_have_text(["sweep", "gpu"])
        expect(page.locator("#job-metadata")).to_have_text('{"commit":"abc123"}')
        page.click("#edit-labels")  # the label editor PATCHes the job
        page.fill("#edit-name", "resnet sweep v2")
        page.fill("#edit-tags", "sweep")
        page.fill("#edit-metadata", '{"team": "vision"}')
        page.click("#save-labels")
        expect(summary).to_contain_text("resnet sweep v2")
        expect(page.locator("#job-metadata")).to_have_text('{"team":"vision"}')
        edited = httpx.get(f"{base}/v1/jobs/{sweep}", timeout=30).json()
        assert (edited["name"], edited["tags"]) == ("resnet sweep v2", ["sweep"])
        assert edited["metadata"] == {"team": "vision"}

        page.goto(f"{base}/#/submit")  # the form sends the labels too
        page.fill("#f-name", "from the form")
        page.fill("#f-tags", "form, ui")
        assert '"tags": [' in page.input_value("#spec-json")
        page.click("#submit-job")
        page.wait_for_url("**/#/jobs/job_*")
        expect(summary).to_contain_text("from the form")
        expect(summary.locator(".tag")).to_have_text(["form", "ui"])
        browser.close()
        assert errors == []


@pytest.mark.slow
def test_cli_submits_with_labels_and_filters(served, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from helpers.service import ROOT

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}, "RIGL_API_URL": served}
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(JOB))

    def rigl(*args):
        done = subprocess.run([sys.executable, "-m", "rigl_core.cli", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    job_id = rigl("submit", str(spec), "--name", "from the cli", "--tag", "cli", "--tag", "cli-2").strip()
    listed = rigl("jobs", "--tag", "cli-2").splitlines()
    assert len(listed) == 1 and listed[0].startswith(job_id) and "'from the cli' #cli #cli-2" in listed[0]
    assert rigl("jobs", "--tag", "cli", "--method", "set") == ""
    assert rigl("jobs", "--name-prefix", "from the").splitlines()[0].startswith(job_id)


# ---------------------------------------------------------------------------------------------- edits (PATCH)
def test_patch_edits_only_the_given_labels_and_merges_metadata(api):
    job = submit(api, name="before", tags=["a", "b"], metadata={"team": "vision", "lr": {"base": 0.1, "warm": 5},
                                                               "drop": 1})
    response = api.patch(f"/v1/jobs/{job['id']}", json={"metadata": {"lr": {"warm": None, "decay": "cos"},
                                                                     "drop": None, "new": [1, 2]}})
    assert response.status_code == 200, response.json()
    edited = response.json()
    assert edited["metadata"] == {"team": "vision", "lr": {"base": 0.1, "decay": "cos"}, "new": [1, 2]}
    assert (edited["name"], edited["tags"]) == ("before", ["a", "b"])  # not given: unchanged

    merge = {"Content-Type": "application/merge-patch+json"}
    response = api.patch(f"/v1/jobs/{job['id']}", content=b'{"name": "after", "tags": ["c", "c", "d"]}', headers=merge)
    assert response.status_code == 200, response.json()
    fetched = api.get(f"/v1/jobs/{job['id']}").json()
    assert (fetched["name"], fetched["tags"], fetched["metadata"]["team"]) == ("after", ["c", "d"], "vision")
    assert ids(api, "tag=a") == [] and ids(api, "tag=c") == [job["id"]]  # the tag filter follows (JobTag rows)

    cleared = api.patch(f"/v1/jobs/{job['id']}", json={"name": None, "tags": None, "metadata": None}).json()
    assert (cleared["name"], cleared["tags"], cleared["metadata"]) == (None, [], {})
    assert ids(api, "tag=c") == []
    events = [e for e in api.get(f"/v1/jobs/{job['id']}/events").json()["data"] if e["type"] == "labels"]
    assert [sorted(e["data"]) for e in events] == [["metadata"], ["name", "tags"], ["metadata", "name", "tags"]]
    assert events[1]["data"] == {"name": "after", "tags": ["c", "d"]}
    unchanged = api.patch(f"/v1/jobs/{job['id']}", json={"name": None})  # no change: no event
    assert unchanged.status_code == 200
    assert len([e for e in api.get(f"/v1/jobs/{job['id']}/events").json()["data"] if e["type"] == "labels"]) == 3


@pytest.mark.parametrize("body,field", [
    ({"name": ""}, "name"),
    ({"name": "line\nbreak"}, "name"),
    ({"tags": ["ok", "Upper"]}, "tags.1"),
    ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
    ({"metadata": ["not", "an", "object"]}, "metadata"),
    ({"metadata": {f"k{i}": i for i in range(65)}}, "metadata"),
    ({"spec": {}}, "spec"),  # only labels can be edited
])
def test_bad_patches_are_422_naming_the_field_and_change_nothing(sqlite_api, body, field):
    job = submit(sqlite_api, name="kept", metadata={"k": 1})
    response = sqlite_api.patch(f"/v1/jobs/{job['id']}", json=body)
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.json()
    after = sqlite_api.get(f"/v1/jobs/{job['id']}").json()
    assert (after["name"], after["metadata"]) == ("kept", {"k": 1})


def test_a_merge_that_outgrows_the_caps_is_refused(sqlite_api):
    job = submit(sqlite_api, metadata={f"k{i:02d}": "v" * 200 for i in range(64)})  # 64 keys: the cap
    response = sqlite_api.patch(f"/v1/jobs/{job['id']}", json={"metadata": {"one_more": 1}})
    assert response.status_code == 422 and response.json()["error"]["field"] == "metadata", response.json()
    assert "after the merge" in response.json()["error"]["message"]
    swapped = sqlite_api.patch(f"/v1/jobs/{job['id']}", json={"metadata": {"k00": None, "one_more": 1}})
    assert swapped.status_code == 200 and "one_more" in swapped.json()["metadata"]


def test_patch_of_a_deleted_or_missing_job_is_404(sqlite_api):
    job = submit(sqlite_api)
    assert sqlite_api.delete(f"/v1/jobs/{job['id']}").status_code == 200
    for job_id in (job["id"], "job_00000000000000000000", "nonsense"):
        response = sqlite_api.patch(f"/v1/jobs/{job_id}", json={"name": "x"})
        assert response.status_code == 404 and response.json()["error"]["field"] == "job_id"


def test_only_the_owner_or_an_admin_can_patch(make_api):
    from store.keys import create_key

    api = make_api(auth=True)
    alice, bob, admin = (create_key(api.store, owner, admin=owner == "root")[1] for owner in ("alice", "bob", "root"))
    as_ = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
    job = api.post("/v1/jobs", json={**JOB, "name": "alice's"}, headers=as_(alice)).json()
    refused = api.patch(f"/v1/jobs/{job['id']}", json={"name": "bob's now"}, headers=as_(bob))
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"  # as if missing
    assert api.patch(f"/v1/jobs/{job['id']}", json={"name": "x"}).status_code == 401
    assert api.patch(f"/v1/jobs/{job['id']}", json={"tags": ["mine"]}, headers=as_(alice)).status_code == 200
    assert api.patch(f"/v1/jobs/{job['id']}", json={"name": "by admin"}, headers=as_(admin)).status_code == 200
    seen = api.get(f"/v1/jobs/{job['id']}", headers=as_(alice)).json()
    assert (seen["name"], seen["tags"]) == ("by admin", ["mine"])


# ---------------------------------------------------------------------------------------------- metadata filter
def test_metadata_filters_combine_and_page(api):
    a = submit(api, metadata={"team": "vision", "epochs": 5, "ablation": True, "lr": 0.5})
    b = submit(api, metadata={"team": "vision", "epochs": "5", "nested": {"team": "nlp"}})
    c = submit(api, metadata={"team": "nlp", "epochs": 50, "ablation": False})
    d = submit(api, metadata={"team": ["vision"], "note": None})  # not scalars: never match
    e = submit(api, tags=["x"])  # no metadata at all
    newest_first = lambda *jobs: [j["id"] for j in sorted(jobs, key=lambda j: j["created_at"])][::-1]  # noqa: E731

    assert ids(api, "metadata.team=vision") == newest_first(a, b)
    assert ids(api, "metadata.team=nlp") == [c["id"]]  # a nested key is not a top-level one
    assert ids(api, "metadata.epochs=5") == newest_first(a, b)  # the integer 5 and the string "5"
    assert ids(api, "metadata.ablation=true") == [a["id"]]
    assert ids(api, "metadata.ablation=false") == [c["id"]]
    assert ids(api, "metadata.lr=0.5") == [a["id"]]
    assert ids(api, "metadata.note=null") == [] and ids(api, "metadata.missing=x") == []
    assert ids(api, "metadata.team=vision&metadata.epochs=5&metadata.ablation=true") == [a["id"]]  # ANDed
    assert ids(api, "metadata.team=vision&metadata.team=nlp") == []
    assert ids(api, "metadata.team=vision&tag=x") == []
    assert d["id"] not in ids(api, "metadata.team=vision") and e["id"] in ids(api, "")

    api.patch(f"/v1/jobs/{c['id']}", json={"metadata": {"team": "vision"}})  # the filter reads the edit
    pages, after = [], None  # pagination walks the filtered list
    while True:
        page = api.get("/v1/jobs?metadata.team=vision&limit=1" + (f"&after={after}" if after else "")).json()
        pages += [job["id"] for job in page["data"]]
        if not page["has_more"]:
            break
        after = pages[-1]
    assert pages == newest_first(a, b, c)


@pytest.mark.parametrize("query,field", [("metadata.=x", "metadata."), ("metadata.a%20b=x", "metadata.a b"),
                                         ('metadata.a"b=x', 'metadata.a"b'), ("metadata.k=", "metadata.k"),
                                         ("&".join(f"metadata.k{i}=v" for i in range(9)), "metadata")])
def test_bad_metadata_filters_are_422_naming_the_parameter(sqlite_api, query, field):
    response = sqlite_api.get(f"/v1/jobs?{query}")
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.json()


def test_cli_submits_metadata_labels_a_job_and_filters(sqlite_api, tmp_path, monkeypatch, capsys):
    """`rigl submit --metadata`, `rigl label`, `rigl jobs --metadata` through the client against the API in
    process (the client's HTTP session is the TestClient)."""
    import json

    from rigl_core import cli
    from rigl_core.client import Client

    def in_process_client():
        client = Client("http://testserver", retries=0)
        client.http = sqlite_api
        return client

    monkeypatch.setattr(cli, "_client", in_process_client)
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({**JOB, "metadata": {"from_file": "yes"}}))
    assert cli.main(["submit", str(spec), "--metadata", "team=vision", "--metadata", "version=1.10"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert sqlite_api.get(f"/v1/jobs/{job_id}").json()["metadata"] == {"from_file": "yes", "team": "vision",
                                                                       "version": "1.10"}  # text, not 1.1
    assert cli.main(["label", job_id, "--name", "relabelled", "--tag", "cli", "--metadata", "team=nlp",
                     "--drop-metadata", "from_file"]) == 0
    assert "'relabelled' #cli" in capsys.readouterr().out
    job = sqlite_api.get(f"/v1/jobs/{job_id}").json()
    assert (job["name"], job["tags"], job["metadata"]) == ("relabelled", ["cli"], {"team": "nlp", "version": "1.10"})
    assert cli.main(["jobs", "--metadata", "team=nlp", "--metadata", "version=1.10"]) == 0
    assert capsys.readouterr().out.startswith(job_id)
    assert cli.main(["jobs", "--metadata", "team=vision"]) == 0 and capsys.readouterr().out == ""
    assert cli.main(["label", job_id, "--no-tags"]) == 0
    assert sqlite_api.get(f"/v1/jobs/{job_id}").json()["tags"] == []
    assert cli.main(["label", job_id]) == 2  # nothing to change: a usage error
