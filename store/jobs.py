"""JobStore: every read and write the API and the worker make, as short transactions.

Claiming is a compare-and-set on the job row with a fresh lease token, so a duplicate delivery of
the same message finds nothing to claim and exits at once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from types import SimpleNamespace

from sqlalchemy import and_, bindparam, case, false, func, insert, literal_column, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased, sessionmaker

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from store.artifacts import issued_id
from store.db import (ArchitectureRecord, Checkpoint, DatasetRecord, Event, IdempotencyRecord, Job, JobTag, OwnerLock,
                      WeightsRecord, db_now, utcnow)
from store.engine import make_engine, make_sessionmaker

TERMINAL = ("succeeded", "failed", "cancelled")
CLAIMABLE = ("queued", "requeued")
ACTIVE = ("queued", "running", "requeued", "cancelling")  # what the per-owner cap counts
UNDISPATCHED = "broker_unavailable"  # error code of a queued job whose message is not in the broker yet
WAITING_FOR_DEVICES = "waiting_for_devices"  # a queued job that a worker passed over: it owns too few devices


class LeaseLost(Exception):
    """A worker's write was refused: its lease on the job was taken over (reaped, reclaimed)."""


class IdempotencyConflict(Exception):
    """Another request with the same Idempotency-Key won the race."""


class TooManyActiveJobs(Exception):
    """The owner already has `max_active` queued or running jobs."""

    def __init__(self, max_active: int):
        super().__init__(f"at most {max_active} queued or running jobs per owner")
        self.max_active = max_active


class UploadGone(Exception):
    """An upload the job refers to was deleted while the job was being submitted; `field` names it."""

    def __init__(self, field: str):
        super().__init__(field)
        self.field = field


class JobStore:
    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        self.sessions: sessionmaker = make_sessionmaker(self.engine)

    # ------------------------------------------------------------------ jobs
    def create_job(self, spec: dict, resolved_spec: dict, total_steps: int, owner: str = "local",
                   idempotency: tuple[str, str] | None = None, max_active: int | None = None,
                   dataset_id: str | None = None, weights_id: str | None = None, name: str | None = None,
                   tags: list[str] | None = None, metadata: dict | None = None) -> Job:
        """`idempotency` = (key, body hash): stored in the same transaction as the job, so two racing
        requests with one key create one job (the loser gets IdempotencyConflict and replays).

        `max_active`: the owner's active-job cap, counted and enforced inside the creating transaction
        after taking the owner's lock row (TooManyActiveJobs), so concurrent submissions can't overshoot.
        `dataset_id`: an uploaded dataset the job reads; it must still exist under its owner's lock, so a
        concurrent `DELETE /v1/datasets/{id}` either sees this job or makes this one fail (UploadGone).
        `weights_id`: the same for uploaded weights (`model.weights`).
        `name`, `tags`, `metadata`: the user's labels (validated by the caller); tags also get JobTag rows."""
        try:
            with self.sessions.begin() as s:
                owners = {owner}
                if dataset_id is not None:
                    owners.add(s.scalar(select(DatasetRecord.owner).where(DatasetRecord.id == dataset_id)) or owner)
                if weights_id is not None:
                    owners.add(s.scalar(select(WeightsRecord.owner).where(WeightsRecord.id == weights_id)) or owner)
                self.lock_owners(s, owners)
                if idempotency is not None and s.get(IdempotencyRecord, (owner, idempotency[0])) is not None:
                    raise IdempotencyConflict()  # its twin committed while we waited for the lock: replay it
                if max_active is not None and self._count_active(s, owner) >= max_active:
                    raise TooManyActiveJobs(max_active)
                if dataset_id is not None and s.get(DatasetRecord, dataset_id) is None:
                    raise UploadGone("dataset.path")
                if weights_id is not None and s.get(WeightsRecord, weights_id) is None:
                    raise UploadGone("model.weights")
                job = self.add_job_rows(s, spec, resolved_spec, total_steps, owner, name, tags, metadata)
                if idempotency is not None:
                    s.add(IdempotencyRecord(owner=owner, key=idempotency[0], body_sha256=idempotency[1],
                                            job_id=job.id))
        except IntegrityError:
            if idempotency is None:
                raise
            raise IdempotencyConflict() from None
        return job

    @staticmethod
    def add_job_rows(session, spec: dict, resolved_spec: dict, total_steps: int, owner: str, name: str | None = None,
                     tags: list[str] | None = None, metadata: dict | None = None, sweep_id: str | None = None) -> Job:
        """The rows of one new queued job, in the caller's transaction (which holds the owner's lock and has
        checked the cap): create_job's, and a sweep's release of held children (store/sweeps.py)."""
        tags = list(dict.fromkeys(tags or []))  # once each, in the order given
        job = Job(spec=spec, resolved_spec=resolved_spec, total_steps=total_steps, owner=owner,
                  devices=required_devices(resolved_spec), name=name, tags=tags or None, meta=metadata,
                  method=(resolved_spec.get("sparsity") or {}).get("method"), sweep_id=sweep_id)
        session.add(job)
        session.flush()
        session.add_all(JobTag(job_id=job.id, tag=tag) for tag in tags)
        session.add(Event(job_id=job.id, type="status", message="queued", data={"status": "queued"}))
        return job

    def lock_owners(self, session, owners: Iterable[str]) -> None:
        """Write each owner's lock row (sorted, so two transactions never wait on each other in a cycle):
        a row lock held to the end of the transaction on PostgreSQL, the database write lock on SQLite."""
        upsert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        for name in sorted(set(owners)):
            statement = upsert(OwnerLock).values(owner=name, touched_at=utcnow())
            session.execute(statement.on_conflict_do_update(index_elements=[OwnerLock.owner],
                                                            set_={"touched_at": statement.excluded.touched_at}))

    def idempotent_job(self, owner: str, key: str) -> IdempotencyRecord | None:
        with self.sessions() as s:
            return s.get(IdempotencyRecord, (owner, key))

    def count_active(self, owner: str) -> int:
        with self.sessions() as s:
            return self._count_active(s, owner)

    @staticmethod
    def _count_active(session, owner: str) -> int:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.owner == owner, Job.status.in_(ACTIVE))) or 0

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        if not issued_id(job_id):
            return None
        with self.sessions() as s:
            query = select(Job).where(Job.id == job_id)
            if owner is not None:
                query = query.where(Job.owner == owner)
            return s.scalars(query).first()

    _VIEW = select(Job.__table__).where(Job.id == bindparam("job_id"))

    def get_job_view(self, job_id: str, owner: str | None = None) -> SimpleNamespace | None:
        """A read-only snapshot of the row with a precompiled Core query: 3× cheaper than the ORM,
        for the status poll every client makes."""
        if not issued_id(job_id):
            return None
        with self.engine.connect() as connection:
            row = connection.execute(self._VIEW, {"job_id": job_id}).mappings().first()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return SimpleNamespace(**row)

    def list_jobs(self, limit: int = 20, after: str | None = None, status: str | None = None,
                  owner: str | None = None, tag: str | None = None, name_prefix: str | None = None,
                  method: str | None = None) -> tuple[list[SimpleNamespace], bool]:
        """Newest first, as read-only snapshots of the rows (a third cheaper than ORM objects); `after` is the id
        of the last job of the previous page. The filters combine (AND); `name_prefix` is case-sensitive on
        both databases (SQLite's LIKE is not, hence substr)."""
        with self.sessions() as s:
            query = select(Job.__table__).order_by(Job.seq.desc())  # rows as snapshots, as get_job_view: no ORM
            if owner is not None:
                query = query.where(Job.owner == owner)
            if status:
                query = query.where(Job.status == status)
            if tag:
                query = query.where(Job.id.in_(select(JobTag.job_id).where(JobTag.tag == tag)))
            if name_prefix:
                query = query.where(func.substr(Job.name, 1, len(name_prefix)) == name_prefix)
            if method:
                query = query.where(Job.method == method)
            if after:
                if not issued_id(after):
                    raise KeyError(after)
                anchor_query = select(Job.seq).where(Job.id == after)
                if owner is not None:  # another owner's id is as good as a missing one: no existence oracle
                    anchor_query = anchor_query.where(Job.owner == owner)
                anchor = s.scalars(anchor_query).first()
                if anchor is None:
                    raise KeyError(after)
                query = query.where(Job.seq < anchor)
            rows = [SimpleNamespace(**row) for row in s.execute(query.limit(limit + 1)).mappings()]
        return rows[:limit], len(rows) > limit

    def claim(self, job_id: str, max_attempts: int, lease_seconds: float = 120, worker: str | None = None,
              devices: int | None = None) -> tuple[Job | None, str]:
        """Take a job for this process. Returns (job, token) or (None, why-not).

        A message is a slot, not a ticket: the job taken is the fairest claimable one (`_fair_candidate`:
        the owner with the fewest running jobs, then the owner served longest ago, then the oldest job),
        not necessarily `job_id`, so one owner's backlog can't monopolise the workers. Every job sends
        one message, so messages and claimable jobs balance. The exception: `job_id` held by a worker
        that stopped heart-beating for `lease_seconds` (by the database's clock) is taken back directly.
        Each take is a compare-and-set on (status, attempt, lease_token) under the row lock, so two
        claimers never both win. Failed runs (attempt - preemptions) are capped by `max_attempts`.

        `devices`: how many this worker owns (None: no device filter, one kind of worker). A slot then has
        the class of its message's job, c = `Job.devices`: it starts only a job needing exactly c devices, and
        only on a worker owning ≥ c. Every job sends one slot of its own class and only that class's slots
        start it, so each class's slots and jobs balance as the whole queue's did, and a backlog of small
        jobs never holds up a big one. A slot too big for this worker is sent on (`forward_class`).
        """
        token = uuid.uuid4().hex
        with self.sessions.begin() as s:
            self._write_lock(s)
            now = db_now(s)
            mine = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
            why = "unknown job" if mine is None else f"already {mine.status}" if mine.status in TERMINAL else None
            taken = None
            if mine is not None and mine.status in ("running", "cancelling"):
                if not _stale(mine.heartbeat_at, now, lease_seconds):
                    why = f"already {mine.status} elsewhere"
                elif devices is not None and mine.devices > devices:
                    why = f"needs {mine.devices} devices, this worker has {devices}"  # the reaper re-sends it
                else:
                    taken = self._take(s, mine, token, now, max_attempts, worker)
                    why = None if taken is not None else f"job {mine.status}"
            tried: set[str] = set()
            slot = None if devices is None else mine.devices if mine is not None else 1
            if slot is not None and slot > devices:
                why = f"a slot for {slot} devices; this worker has {devices}"
            while taken is None and (slot is None or slot <= devices):
                candidate = self._fair_candidate(s, job_id, tried, slot)
                if candidate is None:
                    break
                tried.add(candidate.id)
                taken = self._take(s, candidate, token, now, max_attempts, worker)
                if taken is None and candidate.id == job_id:
                    why = f"job {candidate.status}"
            if taken is None:
                return None, why or "nothing left to claim"
            taken_id = taken.id
        return self.get_job(taken_id), token

    def _write_lock(self, session) -> None:
        """SQLite: take the database's write lock now (a deferred transaction takes it at its first
        write), so reading candidates and claiming one is atomic there. PostgreSQL locks rows instead."""
        if self.engine.dialect.name == "sqlite":
            session.execute(update(Job).where(false()).values(attempt=Job.attempt))

    def _fair_candidate(self, session, job_id: str, tried: set[str], devices: int | None = None) -> Job | None:
        """The next job to start: among claimable jobs (a job whose message never reached the broker
        waits for it, unless this is its message), the owner with the fewest running jobs first, then
        the owner whose latest job started longest ago (so one worker alternates owners), then the
        oldest job. Locked with SKIP LOCKED on PostgreSQL: concurrent claimers take different jobs.
        `devices`: only jobs needing exactly that many (a slot's class); None: any."""
        def claimable_in(table):
            return and_(_claimable(job_id, table), table.id.not_in(tried) if tried else true(),
                        table.devices == devices if devices is not None else true())

        claimable = claimable_in(Job)
        # per waiting owner, three index lookups (ix_jobs_owner_status, ix_jobs_owner_started, the status
        # index), never a pass over all of the owner's jobs: at 100,000 jobs that pass made every claim slow
        waiting = select(Job.owner).where(claimable).distinct().subquery()
        other = aliased(Job)
        running = (select(func.count()).where(other.owner == waiting.c.owner,
                                              other.status.in_(("running", "cancelling"))).scalar_subquery())
        latest = select(func.max(other.started_at)).where(other.owner == waiting.c.owner).scalar_subquery()
        first_waiting = (select(func.min(other.seq)).where(other.owner == waiting.c.owner, claimable_in(other))
                         .scalar_subquery())
        stats = session.execute(select(waiting.c.owner, running, latest, first_waiting)).all()
        never = dt.datetime.min.replace(tzinfo=dt.timezone.utc)

        def fairness(row):
            _owner, count, started, seq = row
            if started is not None and started.tzinfo is None:  # SQLite hands back naive UTC
                started = started.replace(tzinfo=dt.timezone.utc)
            return (count or 0, started or never, seq or 0)

        for owner, *_ in sorted(stats, key=fairness):
            query = select(Job).where(claimable, Job.owner == owner).order_by(Job.seq).limit(1)
            if self.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            job = session.scalars(query).first()
            if job is not None:
                return job
        return None

    def forward_class(self, job_id: str, devices: int) -> int | None:
        """After `claim` took nothing for `job_id`'s slot on a worker owning `devices`: the class (device count)
        of the queue the worker must send the slot on to, when the job needs more devices than the worker owns
        and a job of that class waits; None: the slot is spent. The waiting jobs this worker is too small for
        get a visible note, once: `waiting_for_devices` with the count they wait for (`_take` clears it)."""
        with self.sessions.begin() as s:
            self._write_lock(s)
            need = s.scalar(select(Job.devices).where(Job.id == job_id))
            if need is None or need <= devices:
                return None
            too_big = s.execute(select(Job.id, Job.devices).where(Job.status.in_(CLAIMABLE), Job.error_code.is_(None),
                                                                  Job.devices > devices).order_by(Job.seq)).all()
            for waiting_id, count in too_big:  # in seq order: two workers lock the rows in one order
                message = (f"queued; waiting for a worker with {count} devices (RIGL_WORKER_DEVICES; the last "
                           f"worker that looked has {devices})")
                result = s.execute(update(Job).where(Job.id == waiting_id, Job.status.in_(CLAIMABLE),
                                                     Job.error_code.is_(None))
                                   .values(error_code=WAITING_FOR_DEVICES, error_message=message))
                if result.rowcount == 1:
                    s.add(Event(job_id=waiting_id, type="message", level="warn", message=message,
                                data={"code": WAITING_FOR_DEVICES, "devices": count}))
            waiting = s.scalar(select(Job.id).where(_claimable(job_id), Job.devices == need).limit(1))
        return need if waiting is not None else None

    def _take(self, session, job: Job, token: str, now: dt.datetime, max_attempts: int, worker: str | None
              ) -> Job | None:
        """Claim one locked candidate, or settle it (cancelled / too many failed attempts) and return None."""
        if job.cancel_requested:
            self._set_status(session, job, "cancelled", "cancelled before it (re)started")
            job.lease_token = None
            return None
        failed = job.attempt - (job.preemptions or 0)
        if failed >= max_attempts:
            job.error_code, job.error_message = "too_many_attempts", f"gave up after {failed} failed attempts"
            self._set_status(session, job, "failed", job.error_message)
            job.lease_token = None
            return None
        held = job.status in ("running", "cancelling")
        attempt = job.attempt + 1  # read before the UPDATE, which also refreshes `job` in this session
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == job.status, Job.attempt == job.attempt,
                   Job.lease_token.is_(None) if job.lease_token is None else Job.lease_token == job.lease_token)
            .values(status="running", lease_token=token, heartbeat_at=now, attempt=attempt,
                    started_at=job.started_at or now, worker=worker, preempt_requested=False,
                    error_code=None, error_message=None)  # a live job's only error: broker_unavailable
        )
        if result.rowcount != 1:
            return None
        note = " after a lost worker" if held else ""
        session.add(Event(job_id=job.id, type="status", message=f"running (attempt {attempt}){note}",
                          data={"status": "running", "attempt": attempt}))
        return job

    def _fence(self, session, job_id: str, token: str) -> None:
        """Lease fencing: every write a worker makes first touches its job row on the condition that it
        still holds the lease (row lock on PostgreSQL, write lock on SQLite, until the commit), so a
        worker whose lease was taken over can't write events, checkpoints or a result."""
        result = session.execute(update(Job).where(Job.id == job_id, Job.lease_token == token)
                                 .values(lease_token=Job.lease_token))
        if result.rowcount != 1:
            raise LeaseLost(job_id)

    def holds_lease(self, job_id: str, token: str) -> bool:
        try:
            with self.sessions.begin() as s:
                self._fence(s, job_id, token)
        except LeaseLost:
            return False
        return True

    def heartbeat(self, job_id: str, token: str, step: int | None, metrics: dict | None = None) -> dict:
        """Renew the lease (by the database's clock) and record progress (`step` None: not started yet,
        keep the stored one). Returns {"lease": still ours, "cancel": cancellation requested, "preempt": …}."""
        values: dict = {}
        if step is not None:
            values["step"] = step
        if metrics is not None:
            values["metrics"] = metrics
        with self.sessions.begin() as s:
            values["heartbeat_at"] = db_now(s)
            result = s.execute(update(Job).where(Job.id == job_id, Job.lease_token == token).values(**values))
            flags = s.execute(select(Job.cancel_requested, Job.preempt_requested).where(Job.id == job_id)).first()
        return {"lease": result.rowcount == 1, "cancel": bool(flags and flags[0]), "preempt": bool(flags and flags[1])}

    def request_preempt(self, job_ids: list[str] | None = None, holders: list[str] | None = None) -> None:
        """A worker is shutting down: its running jobs should checkpoint and go back to the queue.
        `holders`: "host:pid" of its training processes (a message's job id need not be the job its
        process runs: messages are slots)."""
        conditions = [Job.id.in_(job_ids)] if job_ids else []
        if holders:
            conditions.append(Job.worker.in_(holders))
        if conditions:
            with self.sessions.begin() as s:
                s.execute(update(Job).where(or_(*conditions), Job.status == "running")
                          .values(preempt_requested=True))

    def finish(self, job_id: str, token: str | None, status: str, message: str = "", result: dict | None = None,
               error_code: str | None = None) -> bool:
        """End the job. With a token (a worker): only while it holds the lease, else False."""
        with self.sessions.begin() as s:
            if token is not None:
                try:
                    self._fence(s, job_id, token)
                except LeaseLost:
                    return False
            now = db_now(s)
            query = select(Job).where(Job.id == job_id)
            job = s.scalars(query.with_for_update()).first()
            if job is None or (token is not None and job.lease_token != token):
                return False
            job.result = result if result is not None else job.result
            if error_code:
                job.error_code, job.error_message = error_code, message
            self._set_status(s, job, status, message)
            job.finished_at = now
            job.lease_token = None
        return True

    def requeue(self, job_id: str, token: str | None, message: str, preempted: bool = True) -> bool:
        """Give the job back after a clean checkpoint (worker shutting down, SIGTERM): `preempted` runs
        don't count against max_attempts. With a token, only while it holds the lease."""
        with self.sessions.begin() as s:
            query = update(Job).where(Job.id == job_id, Job.status.in_(("running", "cancelling")))
            if token is not None:
                query = query.where(Job.lease_token == token)
            values = {"status": "requeued", "lease_token": None, "preempt_requested": False}
            if preempted:
                values["preemptions"] = Job.preemptions + 1
            result = s.execute(query.values(**values))
            if result.rowcount == 1:
                s.add(Event(job_id=job_id, type="status", message=message, data={"status": "requeued"}))
        return result.rowcount == 1

    def stale_jobs(self, lease_seconds: float) -> list[str]:
        """Running jobs whose last heartbeat is older than `lease_seconds` by the database's clock."""
        with self.sessions() as s:
            cutoff = db_now(s) - dt.timedelta(seconds=lease_seconds)
            return list(s.scalars(select(Job.id).where(Job.status.in_(("running", "cancelling")),
                                                       or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))))

    def requeue_stale(self, lease_seconds: float) -> list[str]:
        """The reaper's half: jobs whose worker died are marked `requeued` (their message may be lost).
        That run counts as a failed attempt (no preemption recorded)."""
        requeued = []
        for job_id in self.stale_jobs(lease_seconds):
            with self.sessions.begin() as s:
                self._write_lock(s)
                job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
                if job is None or job.status not in ("running", "cancelling") or not _stale(
                        job.heartbeat_at, db_now(s), lease_seconds):
                    continue
                result = s.execute(update(Job).where(Job.id == job_id, Job.lease_token == job.lease_token,
                                                     Job.status == job.status)
                                   .values(status="requeued", lease_token=None))
                if result.rowcount == 1:
                    s.add(Event(job_id=job_id, type="status", level="warn",
                                message=f"worker lost at step {job.step}; requeued", data={"status": "requeued"}))
                    requeued.append(job_id)
        return requeued

    # ------------------------------------------------------------------ dispatch
    def mark_undispatched(self, job_id: str, reason: str) -> None:
        """Its message could not be sent: it waits in the database, visibly, until the reaper sends it."""
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.status.in_(CLAIMABLE))
                      .values(error_code=UNDISPATCHED, error_message=reason))

    def mark_dispatched(self, job_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.error_code == UNDISPATCHED)
                      .values(error_code=None, error_message=None))

    def undispatched_jobs(self, limit: int = 100) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Job.id).where(Job.status.in_(CLAIMABLE), Job.error_code == UNDISPATCHED)
                                  .order_by(Job.seq).limit(limit)))

    def request_cancel(self, job_id: str, owner: str | None = None) -> Job | None:
        """Conditional UPDATEs (`WHERE status …`), never read-then-write: on SQLite the read is not in the
        write transaction, so a worker's `succeeded` committed in between would be overwritten."""
        if not issued_id(job_id):
            return None
        owned = [Job.id == job_id] + ([Job.owner == owner] if owner is not None else [])
        steps = ((CLAIMABLE, "cancelled", "cancelled before it started"),
                 (("running",), "cancelling", "cancellation requested"),
                 (("cancelling",), None, None))  # asked again: keep the flag, no second event
        with self.sessions.begin() as s:
            for current, status, message in steps:
                values = {"cancel_requested": True}
                if status is not None:
                    values["status"] = status
                if status == "cancelled":  # it waits for nothing any more
                    waiting = Job.error_code == WAITING_FOR_DEVICES
                    values.update(error_code=case((waiting, None), else_=Job.error_code),
                                  error_message=case((waiting, None), else_=Job.error_message))
                if status in TERMINAL:
                    values["finished_at"] = utcnow()
                result = s.execute(update(Job).where(*owned, Job.status.in_(current)).values(**values))
                if result.rowcount == 1:
                    if status is not None:
                        lock_job_events(s, job_id)
                        s.add(Event(job_id=job_id, type="status", message=message, data={"status": status}))
                    break
        return self.get_job(job_id, owner)

    @staticmethod
    def _set_status(session, job: Job, status: str, message: str) -> None:
        job.status = status
        if status in TERMINAL:
            job.finished_at = utcnow()
        lock_job_events(session, job.id)
        session.add(Event(job_id=job.id, type="status", message=message or status, data={"status": status},
                          level="error" if status == "failed" else "info"))

    # ------------------------------------------------------------------ events
    def add_events(self, job_id: str, events: Iterable[dict], token: str | None = None) -> None:
        """`token`: a worker's lease; its events are refused (LeaseLost) once the lease is lost."""
        rows = [{"job_id": job_id, "type": e["type"], "message": e.get("message", ""), "data": e.get("data"),
                 "level": e.get("level", "info"), "created_at": utcnow()} for e in events]
        if rows:
            with self.engine.begin() as connection:  # one executemany, not an ORM object per event
                lock_job_events(connection, job_id)
                if token is not None:
                    self._fence(connection, job_id, token)
                connection.execute(insert(Event), rows)

    def list_events(self, job_id: str, after: int = 0, limit: int = 100, types: tuple[str, ...] | None = None
                    ) -> list[Event]:
        with self.sessions() as s:
            query = select(Event).where(Event.job_id == job_id, Event.id > after)
            if types:
                query = query.where(Event.type.in_(types))
            # `id + 0`: not the primary key's order, so PostgreSQL reads the job's rows by ix_events_job_id_id and
            # sorts them. Ordered by `id`, it walked the primary key from the cursor to the table's end whenever it
            # took a long job's events to be spread evenly, so a stream catching up on a running job (its events
            # the newest in the table) read every event of every job written since (tests/test_scale_indexes.py)
            return list(s.scalars(query.order_by(Event.id + literal_column("0")).limit(limit)))

    def last_event_id(self, job_id: str) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.max(Event.id)).where(Event.job_id == job_id)) or 0

    def series_events(self, job_id: str, types: tuple[str, ...], max_points: int
                      ) -> dict[str, tuple[list[Event], int]]:
        """Per type: (at most `max_points` events, thinned evenly with the first and last kept; the total).
        Thinned in the database (row_number), so a long job's series never loads in full."""
        out = {}
        with self.sessions() as s:
            totals = dict(s.execute(select(Event.type, func.count()).where(Event.job_id == job_id,
                                                                           Event.type.in_(types))
                                    .group_by(Event.type)).all())
            for kind in types:
                total = totals.get(kind, 0)
                query = select(Event).where(Event.job_id == job_id, Event.type == kind)
                if total > max_points:
                    stride = -(-total // (max_points - 1))  # ceil: (max_points - 1) picks, plus the last
                    numbered = (select(Event.id, func.row_number().over(order_by=Event.id).label("rn"))
                                .where(Event.job_id == job_id, Event.type == kind).subquery())
                    picked = select(numbered.c.id).where(or_((numbered.c.rn - 1) % stride == 0,
                                                             numbered.c.rn == total))
                    query = select(Event).where(Event.id.in_(picked))
                out[kind] = (list(s.scalars(query.order_by(Event.id))), total) if total else ([], 0)
        return out

    # ------------------------------------------------------------------ checkpoints
    def add_checkpoint(self, job_id: str, kind: str, step: int, filename: str, sha256: str, size: int,
                       metrics: dict | None = None, token: str | None = None) -> Checkpoint:
        """`token`: a worker's lease; the row is refused (LeaseLost) once the lease is lost. A resume
        row replaces the job's previous one; `row.replaced` lists the files no row points to any more."""
        replaced = []
        with self.sessions.begin() as s:
            lock_job_events(s, job_id)  # first: before the checkpoint row's foreign-key lock on the job
            if token is not None:
                self._fence(s, job_id, token)
            if kind == "resume":  # one resume checkpoint per job: the newest replaces the row
                for old in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                              Checkpoint.kind == "resume")):
                    if old.filename != filename:
                        replaced.append(old.filename)
                    s.delete(old)
            row = Checkpoint(job_id=job_id, kind=kind, step=step, filename=filename, sha256=sha256, size=size,
                             metrics=metrics)
            s.add(row)
            s.add(Event(job_id=job_id, type="checkpoint", message=f"{kind} checkpoint at step {step}",
                        data={"kind": kind, "step": step, "sha256": sha256}))
        row.replaced = replaced  # not a column: for the worker to delete
        return row

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        with self.sessions() as s:
            return list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                  .order_by(Checkpoint.created_at)))

    def latest_checkpoint(self, job_id: str, kind: str) -> Checkpoint | None:
        with self.sessions() as s:
            return s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == kind)
                             .order_by(Checkpoint.step.desc())).first()

    # ------------------------------------------------------------------ uploads
    def add_architecture(self, name: str, spec: dict, params: int, owner: str = "local") -> ArchitectureRecord:
        with self.sessions.begin() as s:
            row = ArchitectureRecord(name=name, spec=spec, params=params, owner=owner)
            s.add(row)
        return row

    def get_architecture(self, arch_id: str, owner: str | None = None) -> ArchitectureRecord | None:
        return self._get_owned(ArchitectureRecord, arch_id, owner)

    def list_architectures(self, owner: str | None = None) -> list[ArchitectureRecord]:
        return self._list_owned(ArchitectureRecord, owner)

    def add_dataset(self, **fields) -> DatasetRecord:
        with self.sessions.begin() as s:
            row = DatasetRecord(**fields)
            s.add(row)
        return row

    def get_dataset(self, dataset_id: str, owner: str | None = None) -> DatasetRecord | None:
        return self._get_owned(DatasetRecord, dataset_id, owner)

    def list_datasets(self, owner: str | None = None) -> list[DatasetRecord]:
        return self._list_owned(DatasetRecord, owner)

    def add_weights(self, **fields) -> WeightsRecord:
        with self.sessions.begin() as s:
            row = WeightsRecord(**fields)
            s.add(row)
        return row

    def get_weights(self, weights_id: str, owner: str | None = None) -> WeightsRecord | None:
        return self._get_owned(WeightsRecord, weights_id, owner)

    def list_weights(self, owner: str | None = None) -> list[WeightsRecord]:
        return self._list_owned(WeightsRecord, owner)

    def _get_owned(self, record, record_id: str, owner: str | None):
        """One upload by id; with `owner`, someone else's is as good as missing."""
        if not issued_id(record_id):
            return None
        with self.sessions() as s:
            query = select(record).where(record.id == record_id)
            if owner is not None:
                query = query.where(record.owner == owner)
            return s.scalars(query).first()

    def _list_owned(self, record, owner: str | None) -> list:
        with self.sessions() as s:
            query = select(record).order_by(record.created_at.desc())
            if owner is not None:
                query = query.where(record.owner == owner)
            return list(s.scalars(query))

    def ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")


def lock_job_events(connection, job_id: str) -> None:
    """Call in a transaction before inserting events of `job_id` (a Session or a Connection).

    Event ids come from one sequence, but on PostgreSQL a transaction that took id 10 may commit
    after one that took id 11, and a stream that already read 11 (cursor `id > 11`) would never
    see 10. Holding the job row (FOR NO KEY UPDATE, which the job's UPDATEs take anyway) from
    before the insert to the commit makes one job's event ids commit in id order, so the
    per-job cursor is commit-safe. SQLite serialises writers already: nothing to do.

    Transactions that UPDATE the job row before inserting its event (claim's take, requeue,
    requeue_stale, finish's fence) hold this lock already; the rest (add_events, add_checkpoint,
    _set_status, request_cancel) call this first. create_job's first event needs none: nobody else
    can see the job before that transaction commits.
    """
    dialect = connection.dialect if hasattr(connection, "dialect") else connection.get_bind().dialect
    if dialect.name == "postgresql":
        connection.execute(select(Job.id).where(Job.id == job_id).with_for_update(key_share=True))


def required_devices(spec: dict) -> int:
    """The fewest devices a worker must own to run a job: `training.devices`, or 1 for "all" (any worker
    runs it, on all of its own devices)."""
    value = (spec.get("training") or {}).get("devices", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def _claimable(job_id: str, table=Job):
    """Waiting to start: a job whose message never reached the broker waits for it, unless this is its message.
    `table`: Job or an alias of it."""
    return and_(table.status.in_(CLAIMABLE),
                or_(table.error_code.is_(None), table.error_code != UNDISPATCHED, table.id == job_id))


def _stale(heartbeat: dt.datetime | None, now: dt.datetime, lease_seconds: float) -> bool:
    if heartbeat is None:
        return True
    if heartbeat.tzinfo is None:  # SQLite hands back naive UTC
        heartbeat = heartbeat.replace(tzinfo=dt.timezone.utc)
    return (now - heartbeat).total_seconds() > lease_seconds
