"""A real worker's output is JSON lines only (RIGL_LOG_FORMAT=json), Celery's banner and Python's warnings
included, and the lines about a job carry its `job_id`: the run's, its heartbeat thread's, and the reaper's
"lost its worker; requeued". The same worker's metrics port listens on 127.0.0.1 and wants the token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import httpx
import pytest

from helpers.service import ROOT, free_port, wait_for
from store.settings import Settings


SMALL = {"model": {"name": "mlp", "hidden_sizes": [16]}, "dataset": {"name": "digits"},
         "sparsity": {"method": "rigl", "sparsity": 0.9}, "training": {"epochs": 1, "batch_size": 64}}


@pytest.mark.slow
@pytest.mark.serial  # leases of 2-3 seconds: one at a time, beside niced tests only (.ci/run)
def test_every_worker_line_is_json_and_job_lines_carry_the_job_id(tmp_path):
    from store.jobs import JobStore

    port, token = free_port(), uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_") and k != "PYTHONWARNINGS"}
    env.update({"RIGL_DATA_DIR": str(tmp_path), "RIGL_LOG_FORMAT": "json", "RIGL_LEASE_SECONDS": "2",
                "RIGL_REAPER_INTERVAL_SECONDS": "0.3", "RIGL_CANCEL_POLL_SECONDS": "0.3",
                "RIGL_WORKER_METRICS_PORT": str(port), "RIGL_METRICS_TOKEN": token,
                "PYTHONWARNINGS": "always"})  # whatever warns (Celery's root warning, torch's), warns every time
    settings = Settings(data_dir=tmp_path).resolved()
    store = JobStore(settings.database_url, settings)
    lost = store.create_job(SMALL, SMALL, total_steps=29).id  # a job whose worker died: the reaper's
    claimed, _token = store.claims.claim(lost, max_attempts=3, lease_seconds=2)
    assert claimed is not None
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        worker = subprocess.Popen([sys.executable, "-m", "rigl_core.cli", "worker", "--name", "logs@%h"], env=env,
                                  stdout=stdout, stderr=stderr, cwd=ROOT, start_new_session=True)
    try:
        job = wait_for(lambda: (lambda j: j if j.status in ("succeeded", "failed") else None)(store.get_job(lost)),
                       180, interval=0.3, what="the reaped job to run again")
        assert job.status == "succeeded", job.error_message
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url).status_code == 401
        assert "rigl_worker_job_runs_total" in httpx.get(url, headers={"Authorization": f"Bearer {token}"}).text
        listening = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
        local = [fields[1] for fields in listening if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port]
        assert local == ["0100007F:" + f"{port:04X}"], local  # 127.0.0.1 only
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    lines = [(name, line) for name, path in (("stdout", out), ("stderr", err))
             for line in path.read_text().splitlines()]
    parsed = []
    for name, line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a {name} line of the worker is not JSON: {line!r}")
    assert all(isinstance(record, dict) and {"time", "level", "logger", "message", "job_id"} <= set(record)
               for record in parsed)
    about = [record for record in parsed if lost in record["message"]]
    assert about and all(record["job_id"] == lost for record in about), [r for r in about if r["job_id"] != lost]
    requeued = [r for r in parsed if r["logger"] == "rigl.reaper" and "lost its worker; requeued" in r["message"]]
    assert requeued and requeued[0]["job_id"] == lost
    print(f"\nreliability: worker logs: {len(parsed)} lines (stdout {sum(n == 'stdout' for n, _ in lines)}, stderr "
          f"{sum(n == 'stderr' for n, _ in lines)}), all JSON; {sum(r['job_id'] == lost for r in parsed)} carry the "
          f"job's id")


def test_the_reapers_requeue_line_carries_the_job_id(tmp_path):
    """In process (the API's reaper is the same class): the "lost its worker; requeued" line names the job in
    its `job_id` field, not only in its text."""
    import io
    import logging

    from service_common.log_context import configure_logging
    from store.jobs import JobStore
    from store.reaper import Reaper

    store = JobStore(f"sqlite:///{tmp_path / 'rigl.db'}")
    job_id = store.create_job(SMALL, SMALL, total_steps=29).id
    assert store.claims.claim(job_id, max_attempts=3, lease_seconds=0.05)[0] is not None
    stream = io.StringIO()
    handler = configure_logging("json", stream=stream)
    try:
        wait_for(lambda: Reaper(store, lambda _job: None, lease_seconds=0.05, interval=1).work() == [job_id], 10,
                 what="the stale job to be requeued")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    requeued = [line for line in lines if line["message"] == f"job {job_id} lost its worker; requeued"]
    assert requeued and requeued[0]["job_id"] == job_id and requeued[0]["logger"] == "rigl.reaper"
