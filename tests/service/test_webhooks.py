"""Webhooks: signed deliveries of job and sweep state changes to a real HTTP receiver on 127.0.0.1, retried
with backoff and logged; written in the transaction of the change (none for a rolled-back one); addresses
the operator has not allowed refused at creation (422 naming `url`) and again at send time.

The sender is driven pass by pass (`run_once`), so nothing waits on a clock."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from sqlalchemy import func, select

from api.webhook_sender import WebhookSender
from helpers.doc_pages import block
from helpers.service import JOB, postgres_available, temporary_postgres_database
from store.db import Job, Webhook, WebhookDelivery
from store.job_state import set_status


needs_pg = pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers the next of `answers` (then 200)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.answers: list[tuple[int, dict]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers = receiver.answers.pop(0) if receiver.answers else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_pg)])
def api(request, make_api, make_settings):
    """Private and loopback addresses allowed (the receiver is on 127.0.0.1); retries due at once. On a
    SQLite file and on a real PostgreSQL database."""
    overrides = {"webhook_allow_private": True, "webhook_retry_base_seconds": 0}
    if request.param == "sqlite":
        yield make_api(**overrides)
        return
    from fastapi.testclient import TestClient

    from api.app import create_app

    with temporary_postgres_database() as url:
        settings = make_settings(database_url=url, auth=False, **overrides)
        with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as client:
            client.settings, client.store = settings, client.app.state.context.store
            yield client
            client.store.engine.dispose()


def sender(api) -> WebhookSender:
    return WebhookSender(api.store, api.settings)


def register(api, url: str, **body) -> dict:
    response = api.post("/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.json()
    return response.json()


def deliveries(api, hook_id: str) -> list[dict]:
    response = api.get(f"/v1/webhooks/{hook_id}/deliveries")
    assert response.status_code == 200, response.json()
    return response.json()["data"]


def verify_from_docs():
    """The verification function of docs/guide/webhooks.md, run as written."""
    namespace: dict = {}
    exec(block("python", "guide/webhooks.md", "def verify"), namespace)
    return namespace["verify"]


def test_a_job_change_is_delivered_signed_and_logged(api, receiver):
    hook = register(api, receiver.url)
    assert hook["secret"].startswith("whsec_") and "secret" not in api.get(f"/v1/webhooks/{hook['id']}").json()
    assert "secret" not in api.get("/v1/webhooks").json()["data"][0]
    job = api.post("/v1/jobs", json={**JOB, "name": "hooked"}).json()
    [pending] = deliveries(api, hook["id"])
    assert (pending["event_type"], pending["status"], pending["attempts"]) == ("job.queued", "pending", 0)

    assert sender(api).run_once() == 1
    [request] = receiver.requests
    headers = request["headers"]
    assert request["path"] == "/hook" and headers["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert body["type"] == "job.queued" and body["data"] == {"object": "job", "id": job["id"], "status": "queued",
                                                             "name": "hooked", "sweep_id": None, "message": "queued"}
    assert headers["Rigl-Event-Id"] == body["id"] and headers["Rigl-Event-Type"] == "job.queued"
    verify = verify_from_docs()
    assert verify(request["body"], headers["Rigl-Signature"], hook["secret"])
    assert not verify(request["body"], headers["Rigl-Signature"], "whsec_wrong")
    assert not verify(request["body"] + b" ", headers["Rigl-Signature"], hook["secret"])
    old = headers["Rigl-Signature"].replace("t=", "t=1")  # another timestamp: the signature no longer holds
    assert not verify(request["body"], old, hook["secret"])

    [done] = deliveries(api, hook["id"])
    assert (done["status"], done["attempts"], done["status_code"], done["error"]) == ("succeeded", 1, 200, None)
    assert done["log"][0]["duration_ms"] >= 0 and done["next_attempt_at"] is None
    assert sender(api).run_once() == 0  # nothing is sent twice


def test_a_500_is_retried_then_delivered_with_the_same_body(api, receiver):
    hook = register(api, receiver.url)
    receiver.answers = [(500, {}), (503, {})]
    api.post("/v1/jobs", json=JOB)
    assert sender(api).run_once() == 3  # retries due at once here (webhook_retry_base_seconds=0)
    assert len(receiver.requests) == 3 and len({r["body"] for r in receiver.requests}) == 1
    assert len({r["headers"]["Rigl-Event-Id"] for r in receiver.requests}) == 1
    [delivery] = deliveries(api, hook["id"])
    assert (delivery["status"], delivery["attempts"]) == ("succeeded", 3)
    assert [(a["attempt"], a["status_code"], a["error"]) for a in delivery["log"]] == [
        (1, 500, "HTTP 500"), (2, 503, "HTTP 503"), (3, 200, None)]


def test_retries_back_off_and_give_up(make_api, receiver):
    api = make_api(webhook_allow_private=True, webhook_retry_base_seconds=10, webhook_max_attempts=2)
    hook = register(api, receiver.url)
    receiver.answers = [(500, {})] * 5
    api.post("/v1/jobs", json=JOB)
    assert sender(api).run_once() == 1  # the retry is due in 10 s, not now
    [delivery] = deliveries(api, hook["id"])
    assert (delivery["status"], delivery["attempts"]) == ("pending", 1)
    with api.store.sessions.begin() as s:  # move the clock past the wait: the row says when it is due
        row = s.scalars(select(WebhookDelivery)).one()
        seconds = (row.next_attempt_at - row.created_at).total_seconds()
        row.next_attempt_at = row.created_at
    assert 10 <= seconds < 60
    assert sender(api).run_once() == 1
    [delivery] = deliveries(api, hook["id"])
    assert (delivery["status"], delivery["attempts"], delivery["next_attempt_at"]) == ("failed", 2, None)
    assert sender(api).run_once() == 0 and len(receiver.requests) == 2


def test_redirects_are_not_followed(api, receiver):
    elsewhere = Receiver()
    try:
        hook = register(api, receiver.url)
        receiver.answers = [(302, {"Location": elsewhere.url})] + [(307, {"Location": elsewhere.url})] * 4
        api.post("/v1/jobs", json=JOB)
        sender(api).run_once()
        [delivery] = deliveries(api, hook["id"])
        assert delivery["status"] == "failed" and delivery["attempts"] == 5
        assert delivery["log"][0]["error"] == "HTTP 302 (redirects are not followed)"
        assert elsewhere.requests == []
    finally:
        elsewhere.close()


def test_state_changes_become_deliveries_for_the_owners_endpoints_only(make_api, receiver):
    from store.keys import create_key

    api = make_api(auth=True, webhook_allow_private=True, webhook_retry_base_seconds=0)
    alice, bob = ({"Authorization": f"Bearer {create_key(api.store, owner)[1]}"} for owner in ("alice", "bob"))
    every = api.post("/v1/webhooks", json={"url": receiver.url}, headers=alice).json()
    ends = api.post("/v1/webhooks", json={"url": receiver.url, "events": ["job.cancelled", "job.failed"]},
                    headers=alice).json()
    job = api.post("/v1/jobs", json=JOB, headers=alice).json()
    api.post("/v1/jobs", json=JOB, headers=bob)  # bob's job: nothing for alice's endpoints
    api.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    sender(api).run_once()
    sent = [(json.loads(r["body"])["type"], json.loads(r["body"])["data"]["id"]) for r in receiver.requests]
    assert sorted(sent) == sorted([("job.queued", job["id"]), ("job.cancelled", job["id"]),
                                   ("job.cancelled", job["id"])])
    first = lambda hook: [d["event_type"] for d in api.get(  # noqa: E731
        f"/v1/webhooks/{hook['id']}/deliveries", headers=alice).json()["data"]]
    assert first(every) == ["job.cancelled", "job.queued"] and first(ends) == ["job.cancelled"]

    # endpoints are their owner's: bob neither sees nor deletes nor tests alice's
    assert api.get("/v1/webhooks", headers=bob).json()["data"] == []
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/deliveries"), ("POST", "/test")):
        response = api.request(method, f"/v1/webhooks/{every['id']}{path}", headers=bob)
        assert response.status_code == 404 and response.json()["error"]["field"] == "webhook_id", (method, path)
    assert api.delete(f"/v1/webhooks/{every['id']}", headers=alice).json()["deleted"] is True
    assert api.get(f"/v1/webhooks/{every['id']}/deliveries", headers=alice).status_code == 404


def test_a_rolled_back_change_sends_nothing_and_a_worker_side_change_does(api, receiver):
    hook = register(api, receiver.url)
    job = api.post("/v1/jobs", json=JOB).json()
    store = api.store
    with pytest.raises(RuntimeError), store.sessions.begin() as s:
        row = s.scalars(select(Job).where(Job.id == job["id"])).one()
        set_status(s, row, "failed", "about to roll back")
        s.flush()
        raise RuntimeError("rolled back")
    assert [d["event_type"] for d in deliveries(api, hook["id"])] == ["job.queued"]

    # what a worker does: claim (running) and finish (succeeded), through the store
    claimed, token = store.claims.claim(job["id"], max_attempts=3, worker="test-host:1")
    assert claimed is not None
    assert store.leases.finish(job["id"], token, "succeeded", "done")
    assert [d["event_type"] for d in deliveries(api, hook["id"])] == ["job.succeeded", "job.running", "job.queued"]
    sender(api).run_once()
    assert [json.loads(r["body"])["type"] for r in receiver.requests] == ["job.queued", "job.running",
                                                                         "job.succeeded"]


def test_the_test_route_sends_a_test_event(api, receiver):
    hook = register(api, receiver.url)
    queued = api.post(f"/v1/webhooks/{hook['id']}/test")
    assert queued.status_code == 202 and queued.json()["event_type"] == "webhook.test"
    sender(api).run_once()
    assert json.loads(receiver.requests[0]["body"])["data"] == {"object": "webhook", "id": hook["id"]}


def test_sweep_cancel_and_finish_are_delivered(make_api, receiver):
    api = make_api(webhook_allow_private=True, webhook_retry_base_seconds=0)
    hook = register(api, receiver.url, events=["sweep.finished", "sweep.cancelled"])
    grid = {"sparsity": [0.5, 0.8]}
    cancelled = api.post("/v1/sweeps", json={"base": JOB, "grid": grid}).json()
    api.post(f"/v1/sweeps/{cancelled['id']}/cancel")
    finished = api.post("/v1/sweeps", json={"base": JOB, "grid": grid, "name": "two"}).json()
    children = [c["id"] for c in api.get(f"/v1/sweeps/{finished['id']}").json()["children"]]
    api.post(f"/v1/jobs/{children[0]}/cancel")
    assert [d["event_type"] for d in deliveries(api, hook["id"])] == ["sweep.cancelled"]
    api.post(f"/v1/jobs/{children[1]}/cancel")  # the last child ends: the sweep has finished
    sender(api).run_once()
    sent = [json.loads(r["body"])["data"] for r in receiver.requests]
    assert sent == [{"object": "sweep", "id": cancelled["id"], "status": "cancelled", "name": None},
                    {"object": "sweep", "id": finished["id"], "status": "finished", "name": "two"}]


# ---------------------------------------------------------------------------------------------- addresses
@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://10.1.2.3/hook",
                                 "http://169.254.169.254/latest/meta-data/", "http://[::1]/hook",
                                 "http://[::ffff:127.0.0.1]/hook", "http://0.0.0.0/hook", "http://224.0.0.1/hook",
                                 "http://100.64.0.1/hook", "http://192.168.1.1/hook"])
def test_private_and_special_addresses_are_refused_by_default(make_api, url):
    api = make_api()
    response = api.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.json()
    assert response.json()["error"]["field"] == "url" and "may not reach" in response.json()["error"]["message"]
    assert api.get("/v1/webhooks").json()["data"] == []


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://user:pw@example.com/", "http:///nohost",
                                 "http://example.com:99999/", "not a url", "http://no-such-host.invalid/"])
def test_malformed_urls_are_422_naming_url(make_api, url):
    response = make_api().post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422 and response.json()["error"]["field"] == "url", response.json()


def test_the_operator_settings_open_only_what_they_name(make_api):
    private = make_api(webhook_allow_private=True)
    for url in ("http://127.0.0.1:9/", "http://localhost:9/", "http://10.1.2.3/", "http://192.168.1.1/"):
        assert private.post("/v1/webhooks", json={"url": url}).status_code == 201, url
    for url in ("http://169.254.169.254/", "http://224.0.0.1/", "http://0.0.0.0/"):  # never "private"
        assert private.post("/v1/webhooks", json={"url": url}).status_code == 422, url
    listed = make_api(webhook_allowed_networks="127.0.0.1/32, 169.254.0.0/16")
    assert listed.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/"}).status_code == 201
    assert listed.post("/v1/webhooks", json={"url": "http://169.254.169.254/"}).status_code == 201
    assert listed.post("/v1/webhooks", json={"url": "http://127.0.0.2:9/"}).status_code == 422
    assert listed.post("/v1/webhooks", json={"url": "http://10.1.2.3/"}).status_code == 422


def test_the_address_is_checked_again_at_send_time(make_api, receiver):
    """An endpoint whose host resolves to a refused address by the time it is sent to (DNS rebinding, or
    the operator closed the range) gets a refused attempt and no connection."""
    api = make_api(webhook_retry_base_seconds=0)  # no private addresses
    with api.store.sessions.begin() as s:  # as if it had resolved to a public address at creation
        s.add(Webhook(id="wh_00000000000000000001", owner="local", url=receiver.url.replace("127.0.0.1", "localhost"),
                      secret="whsec_x"))
    api.post("/v1/jobs", json=JOB)
    sender(api).run_once()
    [delivery] = deliveries(api, "wh_00000000000000000001")
    assert delivery["status"] == "failed" and receiver.requests == []
    assert delivery["error"].startswith("refused: host 'localhost' resolves to")


def test_endpoints_per_owner_are_capped(make_api):
    api = make_api(webhook_allow_private=True, max_webhooks_per_owner=2)
    for _ in range(2):
        assert api.post("/v1/webhooks", json={"url": "http://10.0.0.1/"}).status_code == 201
    response = api.post("/v1/webhooks", json={"url": "http://10.0.0.1/"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "too_many_webhooks"
    bad = api.post("/v1/webhooks", json={"url": "http://10.0.0.1/", "events": ["job.exploded"]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "events.0"
    with api.store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Webhook)) == 2


def test_finished_deliveries_are_pruned_after_30_days(api, receiver):
    from store import webhooks

    hook = register(api, receiver.url)
    api.post("/v1/jobs", json=JOB)
    sender(api).run_once()
    api.post(f"/v1/webhooks/{hook['id']}/test")  # pending: never pruned
    assert webhooks.prune(api.store) == 0
    with api.store.sessions.begin() as s:
        for row in s.scalars(select(WebhookDelivery)):
            row.created_at = row.created_at.replace(year=row.created_at.year - 1)
    assert webhooks.prune(api.store) == 1
    assert [d["event_type"] for d in deliveries(api, hook["id"])] == ["webhook.test"]


@pytest.mark.slow
def test_rigl_serve_delivers_a_trained_jobs_changes(tmp_path, receiver):
    """`rigl serve` (API + worker processes): a job trained by the worker reaches the receiver as queued,
    running and succeeded, sent by the API's sender, each signed."""
    import httpx

    from helpers.service import serve_process, wait_for

    with serve_process(tmp_path / "data", RIGL_WEBHOOK_ALLOW_PRIVATE="1",
                       RIGL_WEBHOOK_INTERVAL_SECONDS="0.2") as (base, _process):
        hook = httpx.post(f"{base}/v1/webhooks", json={"url": receiver.url}, timeout=30).json()
        job = httpx.post(f"{base}/v1/jobs", json=JOB, timeout=30).json()
        types = lambda: [json.loads(r["body"])["type"] for r in receiver.requests]  # noqa: E731
        wait_for(lambda: "job.succeeded" in types(), 180, what="the job.succeeded delivery")
    assert types() == ["job.queued", "job.running", "job.succeeded"]
    verify = verify_from_docs()
    for request in receiver.requests:
        assert json.loads(request["body"])["data"]["id"] == job["id"]
        assert verify(request["body"], request["headers"]["Rigl-Signature"], hook["secret"])
