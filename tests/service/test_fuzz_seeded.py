"""Seeded fuzzing of every route (helpers/fuzz.py): no request may get a 5xx, on SQLite and PostgreSQL.

Valid requests of jobs, plan, sweeps, architectures, weights and dataset uploads, the lists and every
route with an id, mutated: NULs and lone surrogates put into their strings, keys and query parameters,
hostile numbers and types, lying safetensors and broken .npz uploads, hostile headers. The fast test
sends 500 requests per database; the slow one 5,000 (the review's figure), with fixed seeds, so a
failure replays exactly.
"""

from __future__ import annotations

import pytest

from helpers import fuzz
from helpers.service import postgres_available, temporary_postgres_database
from store.settings import Settings

FAMILIES = ("/v1/jobs", "/v1/plan", "/v1/sweeps", "/v1/architectures", "/v1/weights", "/v1/datasets", "/v1/usage")


def fuzzed(database: str, root, seed: int, count: int) -> fuzz.FuzzResult:
    from contextlib import nullcontext

    from api.app import create_app

    if database == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL here")
    with (temporary_postgres_database() if database == "postgresql" else nullcontext(None)) as url:
        app = create_app(Settings(data_dir=root, database_url=url, auth=False, max_upload_bytes=100_000),
                         enqueue=lambda _id: None, reaper=False)
        try:
            return fuzz.run(app, seed, count)
        finally:
            app.state.context.store.engine.dispose()


def check(result: fuzz.FuzzResult, count: int, database: str) -> None:
    assert result.sent == count
    assert not result.server_errors, f"{len(result.server_errors)} responses ≥ 500; first: {result.server_errors[:3]}"
    routes = " ".join(result.by_route)
    assert all(family in routes for family in FAMILIES), sorted(result.by_route)
    assert sum(result.text_refusals.values()) > count // 10  # the NULs and surrogates did reach the API
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(result.by_status.items()))
    print(f"\nfuzz ({database}): {result.sent} requests, {len(result.server_errors)} 5xx; by status {statuses}; "
          f"{sum(result.text_refusals.values())} refused as invalid_text")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_seeded_fuzz_of_every_route_gets_no_server_error(database, tmp_path):
    result = fuzzed(database, tmp_path, seed=24, count=500)
    check(result, 500, database)


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_five_thousand_seeded_requests_get_no_server_error(database, tmp_path):
    result = fuzzed(database, tmp_path, seed=2024, count=5000)
    check(result, 5000, database)
    assert min(result.by_route.values()) >= 50, result.by_route  # every route got its share
