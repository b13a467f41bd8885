"""A worker's lease, in process on a real SQLite store: preemptions don't spend attempts, the lease is
judged by the database's clock, a worker that lost its lease can't write, the next job is chosen
fairly across owners, the time limit checkpoints first, and a full disk (a real tmpfs) ends the job
`no_space` with no temp files left. The multi-process versions are in test_worker_lease_service.py."""

from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
import uuid

import pytest

from store.settings import Settings

SMALL = {"model": {"name": "mlp", "hidden_sizes": [64, 32]}, "dataset": {"name": "digits"},
         "sparsity": {"method": "rigl", "sparsity": 0.9, "distribution": "erk", "schedule": {"delta_t": 5}},
         "training": {"epochs": 2, "batch_size": 64, "log_every_steps": 5}}


def small(epochs: int) -> dict:
    return {**SMALL, "training": {**SMALL["training"], "epochs": epochs}}


@pytest.fixture()
def store(tmp_path):
    from store.jobs import JobStore

    return JobStore(f"sqlite:///{tmp_path / 'rigl.db'}")


def submit(store, owner: str = "local", spec: dict | None = None) -> str:
    spec = spec or small(2)
    return store.create_job(spec, spec, total_steps=46, owner=owner).id


def statuses(store, job_id: str) -> list[str]:
    return [e.data["status"] for e in store.events.list_events(job_id, limit=1000) if e.type == "status"]


def test_preemptions_do_not_spend_attempts_but_lost_workers_do(store):
    job_id = submit(store)
    for run in range(1, 5):  # four runs, three clean requeues: max_attempts=3 is not reached
        job, token = store.claims.claim(job_id, max_attempts=3, lease_seconds=60)
        assert job is not None and job.attempt == run, token
        if run < 4:
            assert store.leases.requeue(job_id, token, "worker process stopped (SIGTERM); will resume")
    assert store.get_job(job_id).preemptions == 3
    assert store.leases.finish(job_id, token, "succeeded")

    poison = submit(store)
    for run in range(1, 4):  # the control: runs that die without a requeue (found stale) do count
        job, token = store.claims.claim(poison, max_attempts=3, lease_seconds=0.05)
        assert job is not None and job.attempt == run
        time.sleep(0.1)
        assert store.leases.requeue_stale(0.05) == [poison]
    job, why = store.claims.claim(poison, max_attempts=3, lease_seconds=0.05)
    assert job is None
    final = store.get_job(poison)
    assert final.status == "failed" and final.error_code == "too_many_attempts" and final.attempt == 3


def test_heartbeats_and_staleness_use_the_database_clock(store, monkeypatch):
    """A worker whose clock is 300 s behind (or ahead) writes heartbeats that the reaper judges by the
    same clock: neither reaped while alive nor kept alive after it stopped."""
    import store.db as db
    import store.jobs as jobs

    job_id = submit(store)
    _, token = store.claims.claim(job_id, max_attempts=3, lease_seconds=2)
    for skew in (-300, 300):
        shifted = lambda skew=skew: dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=skew)  # noqa: E731
        with monkeypatch.context() as patch:  # the worker's clock, as the worker's code would read it
            patch.setattr(db, "utcnow", shifted)
            patch.setattr(jobs, "utcnow", shifted)
            assert store.leases.heartbeat(job_id, token, step=3)["lease"]
        assert store.leases.requeue_stale(2) == [], skew  # the API's reaper, with a correct clock
    time.sleep(2.3)
    assert store.leases.requeue_stale(2) == [job_id]  # a worker 300 s ahead can't keep a dead job forever


def test_a_worker_that_lost_its_lease_cannot_write(store, tmp_path):
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer
    from store.artifacts import Artifacts
    from store.leases import LeaseLost
    from worker.runner import save_resume_checkpoint

    artifacts = Artifacts(tmp_path / "artifacts")
    job_id = submit(store)
    first, old = store.claims.claim(job_id, max_attempts=3, lease_seconds=0.05)
    time.sleep(0.1)
    assert store.leases.requeue_stale(0.05) == [job_id]  # its heartbeat lapsed: the reaper gave the job away
    second, new = store.claims.claim(job_id, max_attempts=3, lease_seconds=60)
    assert (first.attempt, second.attempt) == (1, 2)

    trainer = Trainer(JobSpec.model_validate(small(2)))
    trainer.step = 7
    current = save_resume_checkpoint(trainer, store, artifacts, job_id, new, second.attempt)
    trainer.step = 9
    with pytest.raises(LeaseLost):  # the stale holder's checkpoint: written to its own file, never published
        save_resume_checkpoint(trainer, store, artifacts, job_id, old, first.attempt)
    with pytest.raises(LeaseLost):
        store.events.add_events(job_id, [{"type": "message", "message": "from the past"}], token=old)
    with pytest.raises(LeaseLost):
        store.checkpoints.add_checkpoint(job_id, "dense", 9, "model.safetensors", "0" * 64, 1, token=old)
    assert store.leases.finish(job_id, old, "succeeded") is False
    assert store.leases.requeue(job_id, old, "stale") is False
    assert store.leases.heartbeat(job_id, old, step=9)["lease"] is False

    rows = store.checkpoints.list_checkpoints(job_id)
    assert [(r.kind, r.step, r.filename) for r in rows] == [("resume", 7, current)]
    assert current != "resume.pt" and ".a2." in current  # attempt-specific: holders never share a file
    files = sorted(p.name for p in artifacts.job_dir(job_id).iterdir())
    assert files == [current]  # the stale holder's file and temp file are gone
    assert "from the past" not in [e.message for e in store.events.list_events(job_id, limit=1000)]
    job = store.get_job(job_id)
    assert job.status == "running" and job.step == 0 and job.lease_token == new
    store.events.add_events(job_id, [{"type": "message", "message": "current holder"}], token=new)
    assert store.leases.finish(job_id, new, "succeeded")


def test_the_next_job_to_start_is_chosen_fairly_across_owners(store):
    a_jobs = [submit(store, owner="alice") for _ in range(5)]
    b_job = submit(store, owner="bob")
    first, _ = store.claims.claim(a_jobs[0], max_attempts=3)
    assert first.id == a_jobs[0]
    # alice has a job running, bob none: alice's second message starts bob's job
    second, _ = store.claims.claim(a_jobs[1], max_attempts=3)
    assert second.id == b_job
    # one each running: the owner served longest ago, then the oldest job
    third, _ = store.claims.claim(b_job, max_attempts=3)
    assert third.id == a_jobs[1]
    store.request_cancel(a_jobs[2])  # cancelled jobs are skipped
    fourth, _ = store.claims.claim(a_jobs[3], max_attempts=3)
    assert fourth.id == a_jobs[3]
    fifth, _ = store.claims.claim(a_jobs[4], max_attempts=3)
    sixth, why = store.claims.claim(a_jobs[2], max_attempts=3)
    assert fifth.id == a_jobs[4] and sixth is None and "cancelled" in why


def test_one_owner_alone_after_another_finished_alternates_owners(store):
    """With one worker nothing else runs at each pick: the owner served longest ago goes first."""
    a_jobs = [submit(store, owner="alice") for _ in range(3)]
    first, token = store.claims.claim(a_jobs[0], max_attempts=3)
    store.leases.finish(first.id, token, "succeeded")
    b_job = submit(store, owner="bob")
    second, _ = store.claims.claim(a_jobs[1], max_attempts=3)
    assert second.id == b_job


@pytest.fixture()
def settings(tmp_path):
    return Settings(data_dir=tmp_path, cancel_poll_seconds=0.2, lease_seconds=30, checkpoint_every_steps=5,
                    checkpoint_min_seconds=0).resolved()


def test_the_time_limit_checkpoints_first_then_ends_the_job_time_limit(settings, store):
    from worker.runner import run_job

    job_id = submit(store, spec=small(200))  # 4600 steps: far more than fit in the limit
    limited = settings.model_copy(update={"job_time_limit_seconds": 4, "time_limit_grace_seconds": 2})
    began = time.monotonic()
    assert run_job(job_id, limited, store) == "failed"
    assert time.monotonic() - began < 30
    job = store.get_job(job_id)
    assert job.error_code == "time_limit" and "time limit" in job.error_message and "/" not in job.error_message
    resume = store.checkpoints.latest_checkpoint(job_id, "resume")
    assert resume is not None and resume.step == job.step > 0  # saved at the step it stopped, not before
    assert (settings.artifact_dir / "jobs" / job_id / resume.filename).is_file()


def test_celery_soft_time_limit_is_still_caught_as_time_limit(settings, store, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    from rigl_core.training.trainer import Trainer
    from worker.runner import run_job

    def interrupted(self):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(Trainer, "fit", interrupted)
    job_id = submit(store)
    assert run_job(job_id, settings, store) == "failed"
    assert store.get_job(job_id).error_code == "time_limit"


def test_a_failing_event_write_does_not_fail_the_job(settings, store, monkeypatch):
    """Events the database refuses (not an outage) are dropped; an outage keeps them for later."""
    from sqlalchemy.exc import DataError, OperationalError

    from worker.runner import run_job

    real = store.events.add_events
    calls = {"n": 0}

    def flaky(job_id, events, token=None):
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            raise OperationalError("INSERT", {}, ConnectionRefusedError("database restarting"))
        if any(e["type"] == "eval" for e in events) and len(events) > 1:
            raise DataError("INSERT", {}, ValueError("refused"))
        return real(job_id, events, token)

    monkeypatch.setattr(store.events, "add_events", flaky)
    job_id = submit(store, spec=small(3))
    assert run_job(job_id, settings, store) == "succeeded"
    assert store.get_job(job_id).status == "succeeded"
    assert [e for e in store.events.list_events(job_id, limit=1000) if e.type == "eval"]  # kept, one by one


@pytest.fixture()
def small_volume(tmp_path):
    """A 3 MiB tmpfs for the artifacts (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "artifacts"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", f"rigl-test-{uuid.uuid4().hex[:6]}",
                             str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_artifact_volume_fails_the_job_no_space_and_leaves_no_temp_files(tmp_path, small_volume, store):
    import os

    from worker.runner import run_job

    settings = Settings(data_dir=tmp_path, artifact_dir=small_volume, cancel_poll_seconds=0.2, lease_seconds=30,
                        checkpoint_every_steps=10, checkpoint_min_seconds=0).resolved()
    job_id = submit(store, spec=small(3))
    (small_volume / "jobs" / job_id).mkdir(parents=True)
    free = os.statvfs(small_volume)
    filler = small_volume / "filler"
    filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 16 * 1024))  # 16 KiB: < any checkpoint
    assert run_job(job_id, settings, store) == "failed"
    job = store.get_job(job_id)
    assert job.error_code == "no_space", (job.error_code, job.error_message)
    assert job.error_message.startswith("no space left on the artifact volume while writing <artifacts>/jobs/")
    assert "bytes free there)" in job.error_message
    warnings = [e for e in store.events.list_events(job_id, limit=1000) if e.level == "warn" and e.type == "message"]
    assert warnings and "no space" in warnings[0].message  # periodic checkpoints skipped, training went on
    assert job.step == 69  # all 3 epochs trained; the final export is what could not be written
    leftovers = [p.name for p in (small_volume / "jobs" / job_id).iterdir()]
    assert not [name for name in leftovers if name.endswith(".tmp")], leftovers
    assert store.checkpoints.list_checkpoints(job_id) == []


def test_a_volume_that_fills_mid_run_keeps_the_last_good_checkpoint_and_every_other_file(tmp_path, small_volume,
                                                                                          store, monkeypatch):
    """The volume fills right after the job's first checkpoint (step 10): the later checkpoints are refused
    half-written and skipped, the step-10 file and row stay intact, the job ends `failed` / `no_space` with
    the file it could not write and the room left, and another job's artifacts are untouched."""
    import hashlib
    import os
    import re

    import worker.runner as runner
    from store.artifacts import sha256_file

    settings = Settings(data_dir=tmp_path, artifact_dir=small_volume, cancel_poll_seconds=0.2, lease_seconds=30,
                        checkpoint_every_steps=10, checkpoint_min_seconds=0).resolved()
    other = small_volume / "jobs" / "job_other"  # a finished job's files, already on the volume
    other.mkdir(parents=True)
    for name in ("model.safetensors", "report.json"):
        (other / name).write_bytes(os.urandom(64 * 1024))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in other.iterdir()}
    real_save, saved = runner.save_resume_checkpoint, []

    def save_then_fill(trainer, *args, **kwargs):  # the real save; after the first, the volume is full
        name = real_save(trainer, *args, **kwargs)
        saved.append(trainer.step)
        if len(saved) == 1:
            free = os.statvfs(small_volume)
            (small_volume / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 16 * 1024))
        return name

    monkeypatch.setattr(runner, "save_resume_checkpoint", save_then_fill)
    job_id = submit(store, spec=small(3))
    assert run_job(job_id, settings, store) == "failed"
    job = store.get_job(job_id)
    assert saved == [10] and job.step == 69  # one good checkpoint; all 3 epochs trained after the disk filled
    assert job.error_code == "no_space"
    found = re.fullmatch(r"no space left on the artifact volume while writing <artifacts>/jobs/" + job_id +
                         r"/(\S+) \(([\d,]+) bytes free there\)", job.error_message)
    assert found, job.error_message
    assert int(found[2].replace(",", "")) < 16 * 1024
    skipped = [e.message for e in store.events.list_events(job_id, limit=1000) if e.level == "warn"]
    assert skipped and all("previous checkpoint stays" in m for m in skipped), skipped
    resume = store.checkpoints.latest_checkpoint(job_id, "resume")
    kept = small_volume / "jobs" / job_id / resume.filename
    assert resume.step == 10 and sha256_file(kept) == resume.sha256  # the last good one, whole
    files = [p.name for p in (small_volume / "jobs" / job_id).iterdir()]
    assert not [name for name in files if name.endswith(".tmp")], files
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in other.iterdir()} == before
    print(f"\nreliability: disk full: a 3 MiB tmpfs filled after the step-10 checkpoint: job failed no_space naming "
          f"the file and {found[2]} bytes free; step-10 checkpoint intact (sha256 matches), 0 temp files, another "
          f"job's {len(before)} files unchanged")


def run_job(job_id, settings, store):
    from worker.runner import run_job as run

    return run(job_id, settings, store)


def test_a_stop_request_during_a_database_outage_still_requeues(settings, store, monkeypatch):
    """The final writes (checkpoint row, requeue) wait out a short outage instead of failing the job."""
    from sqlalchemy.exc import OperationalError

    from worker.runner import run_job

    job_id = submit(store)
    down = threading.Event()
    real_add, real_requeue = store.checkpoints.add_checkpoint, store.leases.requeue

    def unavailable(real):
        def call(*args, **kwargs):
            if down.is_set():
                raise OperationalError("UPDATE", {}, ConnectionRefusedError("connection refused"))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(store.checkpoints, "add_checkpoint", unavailable(real_add))
    monkeypatch.setattr(store.leases, "requeue", unavailable(real_requeue))
    stop = threading.Event()
    stop.set()
    down.set()
    threading.Timer(1.5, down.clear).start()  # the database comes back after 1.5 s
    assert run_job(job_id, settings, store, stop_requested=stop) == "requeued"
    job = store.get_job(job_id)
    assert job.status == "requeued" and job.preemptions == 1
    assert store.checkpoints.latest_checkpoint(job_id, "resume").step == 1
