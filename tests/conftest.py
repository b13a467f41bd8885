"""Fixtures every group shares: one thread for torch, a fresh settings/data folder, the API in process.

Tests that need real processes (rigl serve, Celery workers, PostgreSQL, Redis) use tests/helpers/service.py.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

# Processes the tests start (workers, `rigl serve`, ranks) inherit one torch thread each: on a 2-core machine,
# several processes with two threads each spend their time contending (a small job trained ~20x slower
# beside other work). Set before torch is imported, so it holds here too; a run can still override it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most 8 (each imports torch, ~0.5 GB), unless
    PYTEST_XDIST_AUTO_NUM_WORKERS says otherwise."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(8, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """The container test first: it is the longest (minutes), and last it would leave the other workers idle."""
    items.sort(key=lambda item: item.get_closest_marker("containers") is None)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # deterministic and fast for tiny models on a 2-core box
    yield


@pytest.fixture()
def make_settings(tmp_path):
    """make_settings(**overrides): resolved service Settings whose data folder is this test's tmp_path."""
    from store.settings import Settings

    def make(**overrides):
        return Settings(**{"data_dir": tmp_path, **overrides}).resolved()

    return make


@pytest.fixture()
def settings(make_settings):
    """The default service Settings on this test's tmp_path (SQLite store, filesystem broker, keys off)."""
    return make_settings()


@pytest.fixture()
def make_api(make_settings):
    """make_api(**settings) opens the API in process (FastAPI's TestClient) on a SQLite store in tmp_path.

    No worker runs: submitted job ids land in `client.sent`. The client also carries `.settings` (resolved)
    and `.store` (the app's JobStore). reaper=True starts the reaper and janitor threads as `rigl serve`
    does; the default leaves them off so nothing changes a job behind the test's back. Closed after the test.
    """
    from fastapi.testclient import TestClient

    from api.app import create_app

    with ExitStack() as opened:
        def make(*, reaper: bool = False, **overrides):
            settings = make_settings(**overrides)
            sent: list[str] = []
            client = opened.enter_context(TestClient(create_app(settings, enqueue=sent.append, reaper=reaper)))
            client.settings, client.store, client.sent = settings, client.app.state.context.store, sent
            return client

        yield make


@pytest.fixture()
def api(make_api):
    """The API in process with default settings (see make_api)."""
    return make_api()
