"""Observability: /metrics on a real API (SQLite store), the worker's series after real training runs,
request ids and JSON log lines, and `rigl serve` exporting its worker's series (multiprocess mode)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from helpers.service import JOB, ROOT, free_port, serve_process, wait_for
from store.server_key import keyed_label, label_key
from store.settings import Settings


def scrape(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture()
def api(make_api):
    return make_api(metrics_cache_seconds=0, cancel_poll_seconds=0.2)


def test_request_histogram_and_job_gauges_move(api):
    before = scrape(api.get("/metrics").text)
    assert value(before, "rigl_metrics_database_up") == 1
    job = api.post("/v1/jobs", json=JOB).json()
    for _ in range(3):
        assert api.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert api.get("/v1/jobs/job_doesnotexist").status_code == 404
    assert api.get("/no/such/route").status_code == 404
    after = scrape(api.get("/metrics").text)
    count = "rigl_http_request_duration_seconds_count"
    get_job = {"method": "GET", "route": "/v1/jobs/{job_id}"}
    assert value(after, count, **get_job, status="2xx") - value(before, count, **get_job, status="2xx") == 3
    assert value(after, count, **get_job, status="4xx") == 1  # by template: one series, whatever the id
    assert value(after, count, method="POST", route="/v1/jobs", status="2xx") == 1
    assert value(after, count, method="GET", route="<unmatched>", status="4xx") == 1
    assert not any("job_doesnotexist" in str(labels) for _, labels in after)  # no raw paths as labels
    assert value(after, "rigl_jobs", status="queued") - value(before, "rigl_jobs", status="queued") == 1
    assert value(after, "rigl_queue_depth") == value(before, "rigl_queue_depth") + 1
    assert value(after, "rigl_queue_oldest_age_seconds") > 0
    owner = keyed_label(label_key(api.settings), "local")
    assert value(after, "rigl_owner_active_jobs", owner=owner) == 1

    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    cancelled = scrape(api.get("/metrics").text)
    assert value(cancelled, "rigl_jobs", status="queued") == value(before, "rigl_jobs", status="queued")
    assert value(cancelled, "rigl_jobs", status="cancelled") == value(before, "rigl_jobs", status="cancelled") + 1
    assert value(cancelled, "rigl_queue_depth") == 0 and value(cancelled, "rigl_queue_oldest_age_seconds") == 0
    assert value(cancelled, "rigl_owner_active_jobs", owner=owner) == 0


def test_job_counts_are_cached_between_scrapes(make_api):
    client = make_api(metrics_cache_seconds=3600)
    first = scrape(client.get("/metrics").text)
    client.post("/v1/jobs", json=JOB)
    again = scrape(client.get("/metrics").text)
    assert value(again, "rigl_jobs", status="queued") == value(first, "rigl_jobs", status="queued") == 0
    assert value(again, "rigl_http_request_duration_seconds_count", method="POST", route="/v1/jobs",
                 status="2xx") == 1  # request series are live; only the database counts are reused


def test_metrics_off_and_metrics_token(tmp_path):
    from api.app import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "a", metrics=False), enqueue=lambda j: None,
                               reaper=False)) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/healthz").status_code == 200
    with TestClient(create_app(Settings(data_dir=tmp_path / "b", metrics_token="s3cret"), enqueue=lambda j: None,
                               reaper=False)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["field"] == "Authorization"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_request_ids_access_log_json_and_owner_hashing(tmp_path):
    from api.app import create_app
    from service_common.log_context import configure_logging
    from store.jobs import JobStore
    from store.keys import create_key

    settings = Settings(data_dir=tmp_path, auth=True, metrics_cache_seconds=0).resolved()
    row, key = create_key(JobStore(settings.database_url), "alice@example.com")
    stream = io.StringIO()
    handler = configure_logging("json", stream=stream)
    try:
        with TestClient(create_app(settings, enqueue=lambda job_id: None, reaper=False)) as client:
            auth = {"Authorization": f"Bearer {key}"}
            given = client.post("/v1/jobs", json=JOB, headers={**auth, "X-Request-ID": "trace-42"})
            assert given.status_code == 201 and given.headers["x-request-id"] == "trace-42"
            fresh = client.get("/healthz")
            assert len(fresh.headers["x-request-id"]) == 32
            odd = client.get("/healthz", headers={"X-Request-ID": "a b\"c"})  # not echoed: replaced
            assert odd.headers["x-request-id"] != "a b\"c" and len(odd.headers["x-request-id"]) == 32
            samples = client.get("/metrics").text
    finally:
        import logging

        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "rigl.access"]
    post = next(line for line in access if line["request_id"] == "trace-42")
    assert post["method"] == "POST" and post["route"] == "/v1/jobs" and post["status"] == 201
    assert post["key_id"] == row.id and post["duration_ms"] > 0
    assert post["time"].endswith("+00:00")
    assert key not in stream.getvalue()  # the key's id, never the key
    assert "alice" not in samples  # owners are hashed on /metrics
    assert keyed_label(label_key(settings), "alice@example.com") in samples


def test_owner_labels_are_keyed_not_a_plain_sha256_of_the_name(tmp_path):
    """sha256(name) is reversed by hashing guessed names: the label is an HMAC with the server's key, which
    is made once, kept in the data dir (0600) and reused, or set by RIGL_METRICS_LABEL_KEY."""
    import os

    from api.app import create_app
    from store.jobs import JobStore
    from store.keys import create_key
    from store.server_key import KEY_FILE

    settings = Settings(data_dir=tmp_path, auth=True, metrics_cache_seconds=0).resolved()
    _row, key = create_key(JobStore(settings.database_url), "alice@example.com")
    with TestClient(create_app(settings, enqueue=lambda job_id: None, reaper=False)) as client:
        assert client.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {key}"}).status_code == 201
        owners = [dict(labels)["owner"] for name, labels in scrape(client.get("/metrics").text)
                  if name == "rigl_owner_active_jobs"]
    assert len(owners) == 1
    assert owners[0] != "h:" + hashlib.sha256(b"alice@example.com").hexdigest()[:12]
    assert owners[0] == keyed_label(label_key(settings), "alice@example.com")
    stored = tmp_path / KEY_FILE
    assert os.stat(stored).st_mode & 0o777 == 0o600 and len(stored.read_text().strip()) == 64
    assert label_key(settings) == label_key(settings)  # made once, then read back
    other = Settings(data_dir=tmp_path, metrics_label_key="k" * 32)
    assert keyed_label(label_key(other), "alice@example.com") != owners[0]


def test_worker_metrics_port_listens_on_loopback_and_wants_the_token():
    """The worker's port: 127.0.0.1 unless RIGL_WORKER_METRICS_HOST says otherwise, and, with
    RIGL_METRICS_TOKEN set, 401 without `Authorization: Bearer <token>`, 200 with it."""
    from prometheus_client import CollectorRegistry, Counter

    from worker.metrics import serve

    assert Settings().worker_metrics_host == "127.0.0.1"
    registry = CollectorRegistry()
    Counter("rigl_worker_test_things", "a series to find", registry=registry).inc()
    open_port, guarded_port = free_port(), free_port()
    servers = [serve(registry, open_port), serve(registry, guarded_port, Settings().worker_metrics_host, "s3cret")]
    try:
        assert [server.server_address[0] for server in servers] == ["127.0.0.1", "127.0.0.1"]
        assert "rigl_worker_test_things_total 1.0" in httpx.get(f"http://127.0.0.1:{open_port}/metrics").text
        url = f"http://127.0.0.1:{guarded_port}/metrics"
        refused = httpx.get(url)
        assert refused.status_code == 401 and refused.json()["error"]["field"] == "Authorization"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        allowed = httpx.get(url, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200 and "rigl_worker_test_things_total 1.0" in allowed.text
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.mark.slow
def test_worker_series_move_after_real_runs(api):
    """A run stopped after its first step (a preemption), then its resumption to the end: the worker's
    counters, and its steps/s gauge while the job trains."""
    from prometheus_client import REGISTRY

    from worker.runner import run_job

    def sample(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    job_id = api.post("/v1/jobs", json={**JOB, "training": {"epochs": 6, "batch_size": 32,
                                                             "log_every_steps": 2}}).json()["id"]
    names = ("rigl_worker_preemptions_total", "rigl_worker_steps_total")
    before = {name: sample(name) for name in names}
    before["first"] = sample("rigl_worker_job_attempts_total", attempt="first")
    before["later"] = sample("rigl_worker_job_attempts_total", attempt="later")
    before["ok"] = sample("rigl_worker_job_runs_total", outcome="succeeded")
    stop = threading.Event()
    stop.set()
    assert run_job(job_id, api.settings, stop_requested=stop) == "requeued"
    assert sample("rigl_worker_preemptions_total") == before["rigl_worker_preemptions_total"] + 1
    assert sample("rigl_worker_job_attempts_total", attempt="first") == before["first"] + 1

    seen: list[float] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(sample("rigl_worker_steps_per_second", job_id=job_id, device="cpu"))
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert run_job(job_id, api.settings) == "succeeded"
    finally:
        done.set()
        watcher.join()
    assert max(seen) > 0  # the rate was exported while it trained…
    assert REGISTRY.get_sample_value("rigl_worker_steps_per_second", {"job_id": job_id, "device": "cpu"}) is None
    assert sample("rigl_worker_job_attempts_total", attempt="later") == before["later"] + 1  # …and went with it
    assert sample("rigl_worker_job_runs_total", outcome="succeeded") == before["ok"] + 1
    steps = sample("rigl_worker_steps_total", device="cpu") - before["rigl_worker_steps_total"]
    assert steps > 0 and sample("rigl_worker_images_total", device="cpu") >= steps * 32
    assert sample("rigl_worker_job_run_duration_seconds_count", outcome="succeeded") >= 1


@pytest.mark.slow
def test_rigl_serve_exports_its_workers_series_and_prints_readable_logs(tmp_path):
    """`rigl serve`: the worker's pool process writes multiprocess files, the API's /metrics and the
    worker's own port both export them; the log lines are readable text with request ids."""
    worker_port = free_port()
    with serve_process(tmp_path / "data", tmp_path / "serve.log",
                       RIGL_WORKER_METRICS_PORT=str(worker_port)) as (base, _server):
        job = httpx.post(f"{base}/v1/jobs", json=JOB, headers={"X-Request-ID": "serve-test-1"}, timeout=30).json()
        final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
            httpx.get(f"{base}/v1/jobs/{job['id']}", timeout=10).json()), 120, what="the job")
        assert final["status"] == "succeeded", final

        def worker_counted(url):
            samples = scrape(httpx.get(url, timeout=10).text)
            return samples if value(samples, "rigl_worker_job_runs_total", outcome="succeeded") == 1 else None

        def rates_gone(url):
            """The run is counted before its pool process exits; its live gauges go with the process."""
            samples = worker_counted(url)
            return samples if samples and not any(n == "rigl_worker_steps_per_second" for n, _ in samples) else None

        via_api = wait_for(lambda: rates_gone(f"{base}/metrics"), 30, what="the worker's series on /metrics, "
                           "without the exited process's rates")
        assert value(via_api, "rigl_worker_steps_total", device="cpu") > 0
        assert value(via_api, "rigl_worker_job_attempts_total", attempt="first") == 1
        assert value(via_api, "rigl_jobs", status="succeeded") in (0, 1)  # (cached up to 5 s)
        own_port = worker_counted(f"http://127.0.0.1:{worker_port}/metrics")
        assert own_port is not None and value(own_port, "rigl_worker_steps_total", device="cpu") > 0
        folder = tmp_path / "data" / "metrics" / "worker"  # the job's process folds its files as it exits
        wait_for(lambda: sorted(p.name for p in folder.glob("*.db")) == ["counter_totals.db", "histogram_totals.db"],
                 10, what="the exited process's files folded into the totals")
    text = (tmp_path / "serve.log").read_text()
    line = next(line for line in text.splitlines() if "rigl.access POST /v1/jobs 201" in line)
    assert "[req=serve-test-1]" in line and "+00:00" in line.split()[0]


def test_the_dashboard_and_scrape_config_use_series_that_exist(api):
    """Every rigl_* series the Grafana dashboard queries is one the API or a worker exports."""
    import re

    import yaml
    from prometheus_client import REGISTRY, generate_latest

    from worker.metrics import series

    series()  # the worker's families, registered in this process
    families = {f.name for text in (api.get("/metrics").text, generate_latest(REGISTRY).decode())
                for f in text_string_to_metric_families(text)}
    exported = {name + suffix for name in families for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((ROOT / "docker" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", ())
               for name in re.findall(r"\brigl_[a-z_]+", target["expr"])}
    assert len(queried) >= 12 and queried <= exported, queried - exported
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    assert jobs["rigl-api"]["static_configs"][0]["targets"] == ["api:8000"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    workers = {name for name, s in compose["services"].items() if s.get("command", [None])[:2] == ["rigl", "worker"]}
    assert workers and workers <= set(jobs["rigl-worker"]["dns_sd_configs"][0]["names"])
    assert jobs["rigl-worker"]["dns_sd_configs"][0]["port"] == 9100


FOLD_CHILD = """
import os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from worker.metrics import JobMeter, _process_exited, series
s = series()
s.steps.labels("cpu").inc(int(sys.argv[2]))
s.duration.labels("succeeded").observe(3.0)
s.steps_per_second.labels("job_x", "cpu").set(9.0)
if sys.argv[3] == "fold":
    _process_exited(pid=os.getpid())
"""


def test_job_processes_fold_their_counters_and_scrapes_count_them_once(tmp_path):
    """Multiprocess mode as the worker runs it: each job process's counters survive it, folded into one
    file when it exits; a process killed before folding still counts; its live gauge goes with it."""
    from prometheus_client import CollectorRegistry, generate_latest

    from service_common.metrics_folder import FolderCollector

    folder = tmp_path / "metrics"
    folder.mkdir()
    for steps, how in ((5, "fold"), (7, "fold"), (11, "killed")):
        subprocess.run([sys.executable, "-c", FOLD_CHILD, str(folder), str(steps), how], cwd=ROOT, check=True)
    registry = CollectorRegistry()
    FolderCollector(registry, path=str(folder))
    samples = scrape(generate_latest(registry).decode())
    assert value(samples, "rigl_worker_steps_total", device="cpu") == 5 + 7 + 11
    assert value(samples, "rigl_worker_job_run_duration_seconds_count", outcome="succeeded") == 3
    assert value(samples, "rigl_worker_job_run_duration_seconds_bucket", outcome="succeeded", le="5.0") == 3
    names = sorted(p.name for p in folder.glob("*.db"))
    assert "counter_totals.db" in names and len([n for n in names if n.startswith("counter_")]) == 2  # + the killed one
    live = [labels for name, labels in samples if name == "rigl_worker_steps_per_second"]
    assert live == [frozenset({("job_id", "job_x"), ("device", "cpu")})]  # only the process that never exited
