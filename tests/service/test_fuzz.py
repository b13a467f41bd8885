"""Fuzz the API from its own OpenAPI schema (schemathesis): no generated request may get a 5xx.
Path-traversal attempts on every download route must get a 404. The seeded mutation fuzzer
(test_fuzz_seeded.py) adds what a schema rarely generates: NULs and lone surrogates deep in bodies,
queries and headers, lying uploads, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from api.app import create_app  # noqa: E402
from store.settings import Settings  # noqa: E402

# One pytest-xdist worker runs the whole module (`--dist loadgroup`): test_fuzzed_enough_requests reads the
# counts the schema's cases leave in this process.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("schema-fuzz")]
COUNT = {"requests": 0, "5xx": 0}
METHODS: dict[str, int] = {}  # requests per HTTP method
DELETES: dict[str, int] = {}  # requests per DELETE route: they are fuzzed too


def _app(tmp_root):
    return create_app(Settings(data_dir=tmp_root, auth=False, max_upload_bytes=100_000), enqueue=lambda _id: None,
                      reaper=False)


import tempfile  # noqa: E402

APP = _app(tempfile.mkdtemp(prefix="rigl-fuzz-"))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)


@SCHEMA.exclude(path_regex=".*/events/stream$").parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call()
    COUNT["requests"] += 1
    METHODS[case.method.upper()] = METHODS.get(case.method.upper(), 0) + 1
    if case.method.upper() == "DELETE":
        DELETES[case.path] = DELETES.get(case.path, 0) + 1
    if response.status_code >= 500:
        COUNT["5xx"] += 1
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    content_type = response.headers.get("content-type") or ""
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if response.status_code >= 400 and content_type.startswith("application/json"):
        assert "error" in response.json()


def test_fuzzed_enough_requests():
    assert COUNT["5xx"] == 0
    assert COUNT["requests"] >= 5000, COUNT
    assert set(DELETES) >= {"/v1/jobs/{job_id}", "/v1/datasets/{dataset_id}", "/v1/architectures/{arch_id}"}, DELETES
    methods = ", ".join(f"{method} {count}" for method, count in sorted(METHODS.items()))
    deletes = ", ".join(f"{route} {count}" for route, count in sorted(DELETES.items()) if count > 1)
    print(f"\nfuzz: {COUNT['requests']} requests, {COUNT['5xx']} 5xx; by method {methods}; DELETE routes {deletes}")


TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/etc/passwd",
              "%2Fetc%2Fpasswd", "job_x%2F..%2F..%2Fsecret", "..", "....//....//etc/passwd", "job_x#../../etc"]


@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_path_traversal_on_download_routes_is_404(attempt):
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        for route in ("/v1/jobs/{}/checkpoint", "/v1/jobs/{}/checkpoint?format=packed", "/v1/jobs/{}/checkpoints",
                      "/v1/jobs/{}/sparsity", "/v1/architectures/{}"):
            response = client.get(route.format(attempt))
            assert response.status_code == 404, (route, attempt, response.status_code)
            assert "root:" not in response.text
