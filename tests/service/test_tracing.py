"""Traces (service_common/tracing.py): one job is one trace, from its `POST /v1/jobs` through the worker's run
to each epoch and mask update; off (and unloaded) unless OTEL_* asks for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from helpers.service import JOB, ROOT, embedded_service, wait_for
from helpers.tracing import OtlpReceiver, memory_spans

pytest.importorskip("opentelemetry.sdk.trace", reason="the 'otel' extra")


def by_id(spans) -> dict:
    return {span.context.span_id: span for span in spans}


def ancestors(span, spans_by_id) -> list[str]:
    """The names from `span`'s parent up to its root (within the spans recorded)."""
    names, seen = [], {span.context.span_id}
    while span.parent is not None and span.parent.span_id in spans_by_id and span.parent.span_id not in seen:
        span = spans_by_id[span.parent.span_id]
        seen.add(span.context.span_id)
        names.append(span.name)
    return names


def test_a_submitted_job_is_one_trace_from_its_request_to_its_mask_updates(make_settings):
    """In process: the API (TestClient) stores the request's trace context with the job; the runner (what the
    worker's task runs) continues it; epochs and mask updates nest under the job's span. Two jobs with the same
    seed: two traces, and no span id made twice (the Trainer seeds Python's `random`)."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from worker.runner import run_job

    with memory_spans(service=True) as exporter:
        settings = make_settings()
        with TestClient(create_app(settings, enqueue=lambda _job_id: None, reaper=False)) as client:
            exporter.clear()  # the schema's creation on start is no part of any request
            job_ids = [client.post("/v1/jobs", json=JOB).json()["id"] for _ in range(2)]
            store = client.app.state.context.store
            stored = store.get_job(job_ids[0]).trace_context
            assert [run_job(job_id, settings, store) for job_id in job_ids] == ["succeeded"] * 2
            updates = [e for e in client.get(f"/v1/jobs/{job_ids[0]}/events?limit=1000").json()["data"]
                       if e["type"] == "mask_update"]
        spans = exporter.get_finished_spans()
    assert len({s.context.span_id for s in spans}) == len(spans)
    requests = [s for s in spans if s.name == "POST /v1/jobs"]
    runs = [s for s in spans if s.name == "job.run"]
    assert len(requests) == len(runs) == 2
    assert {r.context.trace_id for r in requests} == {j.context.trace_id for j in runs} and \
        len({r.context.trace_id for r in requests}) == 2
    request = requests[0]
    trace_id = request.context.trace_id
    assert stored["traceparent"].split("-")[1] == format(trace_id, "032x")
    job = next(s for s in runs if s.attributes["rigl.job_id"] == job_ids[0])
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    epochs = [s for s in in_trace if s.name == "epoch"]
    masks = [s for s in in_trace if s.name == "mask_update"]
    index = by_id(spans)
    assert job.context.trace_id == trace_id and "POST /v1/jobs" in ancestors(job, index)
    assert job.attributes["rigl.outcome"] == "succeeded"
    assert [e.attributes["rigl.epoch"] for e in epochs] == [1, 2]
    assert all(index[e.parent.span_id] is job for e in epochs)
    assert len(masks) == len(updates) > 0
    assert sorted(m.attributes["rigl.step"] for m in masks) == sorted(u["data"]["step"] for u in updates)
    assert all(index[m.parent.span_id].name == "epoch" for m in masks)
    inserts = [s for s in in_trace if s.name.startswith("INSERT")]
    assert any("INSERT INTO jobs" in s.attributes.get("db.statement", "") for s in inserts)  # SQL of the request
    assert all(s.name != "connect" for s in spans if s.parent is None)  # no trace per background query


def test_tracing_reads_the_standard_variables():
    from service_common.tracing import requested

    assert not requested({})
    assert requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})


OFF_CHECK = """
import json, sys, tempfile
from fastapi.testclient import TestClient
from api.app import create_app
from store.settings import Settings
from rigl_core.training.trainer import Trainer
from helpers.specs import small_spec
from helpers.service import JOB
app = create_app(Settings(data_dir=tempfile.mkdtemp()).resolved(), enqueue=lambda _id: None, reaper=False)
with TestClient(app) as client:
    job = client.post("/v1/jobs", json=JOB).json()
trainer = Trainer(small_spec(training__epochs=1))
trainer.fit()
print(json.dumps({"status": job["status"], "stored": app.state.context.store.get_job(job["id"]).trace_context,
                  "sdk": "opentelemetry.sdk.trace" in sys.modules, "tracer": trainer.tracer is not None,
                  "telemetry": app._telemetry["tracing"]}))
"""


@pytest.mark.slow
def test_without_otel_variables_nothing_is_traced_or_loaded():
    """Off by default: no SDK imported, FastAPI's own telemetry off, no context stored, no training tracer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RIGL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    out = subprocess.run([sys.executable, "-c", OFF_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": "queued", "stored": None, "sdk": False, "tracer": False, "telemetry": False}


def test_a_missing_extra_is_a_warning_and_tracing_stays_off(monkeypatch, caplog):
    from service_common import tracing

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails as if not installed
    monkeypatch.setattr(tracing, "_warned", False)
    assert tracing.setup("rigl-test") is False
    assert not tracing.enabled()
    assert "'otel' extra" in caplog.text


@pytest.mark.slow
def test_a_job_is_one_trace_across_the_api_and_a_real_worker_process(tmp_path):
    """`rigl serve` (the API and a Celery worker, two processes) exporting to one real OTLP receiver: the
    worker's job span continues the API's request, whatever Celery message ran it."""
    with OtlpReceiver() as receiver, embedded_service(
            tmp_path / "data", tmp_path / "serve.log", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="200") as url:
        job_id = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()["id"]
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "succeeded", 300,
                 what="the job to succeed")
        wait_for(lambda: receiver.named("job.run") and receiver.named("POST /v1/jobs")
                 and receiver.named("run/rigl.train"), 60, what="the spans of both processes")
        updates = [e for e in httpx.get(f"{url}/v1/jobs/{job_id}/events?limit=1000", timeout=10).json()["data"]
                   if e["type"] == "mask_update"]
    spans = list(receiver.spans)
    request = receiver.named("POST /v1/jobs")[0]
    job = receiver.named("job.run")[0]
    assert (request.service, job.service) == ("rigl-api", "rigl-worker")
    in_trace = {s.span_id: s for s in spans if s.trace_id == request.trace_id}
    chain, span = [], job
    while span.parent_id in in_trace:
        span = in_trace[span.parent_id]
        chain.append((span.service, span.name))
    # the request published the message, the worker ran it, the run is the job's span
    assert ("rigl-api", "POST /v1/jobs") in chain and ("rigl-worker", "run/rigl.train") in chain
    epochs = [s for s in spans if s.name == "epoch"]
    masks = [s for s in spans if s.name == "mask_update"]
    assert len(epochs) == JOB["training"]["epochs"] and all(e.parent_id == job.span_id for e in epochs)
    assert len(masks) == len(updates) > 0 and all(in_trace[m.parent_id].name == "epoch" for m in masks)
    assert {s.trace_id for s in [job, *epochs, *masks]} == {request.trace_id}  # one trace
