"""api.origin_guard's rules one by one, in process (the real `rigl serve` is in test_serve.py)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.origin_guard import OriginGuard, default_allowed_hosts, host_name


def _client(hosts, origins=None, base="http://127.0.0.1:8000") -> TestClient:
    app = FastAPI()

    @app.get("/r")
    def read() -> dict:
        return {"ok": True}

    @app.post("/w")
    def write() -> dict:
        return {"ok": True}

    app.add_middleware(OriginGuard, allowed_hosts=hosts, allowed_origins=origins)
    return TestClient(app, base_url=base)


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:8000", True), ("localhost", True), ("LOCALHOST.:8000", True), ("[::1]:8000", True),
    ("10.1.2.3:8000", True), ("[fe80::1]", True), ("box.lan:8000", True),
    ("evil.example", False), ("localhost.evil.example", False), ("127.0.0.1.nip.io", False), ("", False),
])
def test_host_allow_list(host, ok):
    client = _client(default_allowed_hosts("box.lan"))
    response = client.get("/r", headers={"Host": host})
    assert response.status_code == (200 if ok else 400), host
    if not ok:
        assert response.json()["error"]["field"] == "Host"


def test_star_and_unconfigured_answer_any_host():
    for hosts in (["*"], None):
        assert _client(hosts).get("/r", headers={"Host": "anything.example"}).status_code == 200


@pytest.mark.parametrize("headers, status, field", [
    ({"Content-Type": "application/json"}, 200, None),  # curl, the client: no Origin
    ({}, 200, None),  # an empty POST (cancel) from a non-browser client
    ({"Content-Type": "application/octet-stream", "Origin": "http://127.0.0.1:8000"}, 200, None),
    ({"Content-Type": "application/json", "Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}, 200,
     None),
    ({"Origin": "https://ci.example"}, 200, None),  # listed in allowed_origins
    ({"Origin": "http://evil.example"}, 403, "Origin"),
    ({"Origin": "http://127.0.0.1:9999"}, 403, "Origin"),  # another port is another origin
    ({"Origin": "null"}, 403, "Origin"),
    ({"Sec-Fetch-Site": "cross-site"}, 403, "Sec-Fetch-Site"),
    ({"Sec-Fetch-Site": "same-site"}, 403, "Sec-Fetch-Site"),
    ({"Content-Type": "text/plain;charset=UTF-8"}, 403, "Content-Type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 403, "Content-Type"),
    ({"Content-Type": "multipart/form-data; boundary=x"}, 403, "Content-Type"),
    ({"Content-Type": "text/plain", "Origin": "http://127.0.0.1:8000"}, 403, "Content-Type"),
])
def test_state_changing_requests(headers, status, field):
    client = _client(["127.0.0.1"], ["https://ci.example/"])
    response = client.post("/w", headers=headers, content=b"{}")
    assert response.status_code == status, (headers, response.text)
    if field:
        assert response.json()["error"] == {"code": "cross_site_request", "field": field,
                                             "message": response.json()["error"]["message"]}
    # reads are never refused for these headers (the same-origin policy keeps their answers private)
    assert _client(["127.0.0.1"]).get("/r", headers=headers).status_code == 200


def test_default_port_origins_match_their_host():
    client = _client(["*"], base="https://rigl.example.com")
    assert client.post("/w", headers={"Origin": "https://rigl.example.com"}).status_code == 200
    assert client.post("/w", headers={"Origin": "http://rigl.example.com:8080"}).status_code == 403


def test_host_name():
    assert host_name("Example.COM:8000") == "example.com"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("::1") == "::1"
