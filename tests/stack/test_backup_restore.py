"""docs/operations/backup.md's embedded-mode backup and restore, run as written: a job trained before the
backup is, after a restore into an empty data folder, the same job with the same checkpoint."""

from __future__ import annotations

import hashlib
import subprocess

import httpx
import pytest

from helpers.doc_pages import block
from helpers.service import JOB, embedded_service, wait_for


@pytest.mark.slow
def test_the_embedded_backup_restores_jobs_and_their_files(tmp_path):
    commands = block("bash", "operations/backup.md", "rigl-backup.tgz").strip().splitlines()
    backup, restore = commands  # the copy, then putting it back
    original, restored = tmp_path / "original", tmp_path / "restored"
    original.mkdir()
    with embedded_service(original, tmp_path / "first.log") as url:
        job_id = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()["id"]
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "succeeded", 300,
                 what="the job to succeed")
        before = httpx.get(f"{url}/v1/jobs/{job_id}/checkpoint?format=dense", timeout=60).content
    # the service is stopped (the context above), as the page says
    run = lambda command, folder: subprocess.run(  # noqa: E731
        command.replace("~/.rigl", str(folder)), shell=True, cwd=tmp_path, check=True)
    run(backup, original)
    run(restore, restored)
    with embedded_service(restored, tmp_path / "second.log") as url:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        after = httpx.get(f"{url}/v1/jobs/{job_id}/checkpoint?format=dense", timeout=60)
    assert job["status"] == "succeeded"
    assert after.status_code == 200
    assert hashlib.sha256(after.content).hexdigest() == hashlib.sha256(before).hexdigest()
    assert after.headers["X-Content-SHA256"] == hashlib.sha256(before).hexdigest()
