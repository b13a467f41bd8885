"""Claims: which queued job a worker's message starts, taken with a fresh lease token.

Claiming is a compare-and-set on the job row with a fresh lease token, so a duplicate delivery of
the same message finds nothing to claim and exits at once; the job taken is the fairest claimable one.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import and_, func, or_, select, true, update
from sqlalchemy.orm import aliased

from store.db import Event, Job, db_now
from store.job_state import CLAIMABLE, TERMINAL, UNDISPATCHED, WAITING_FOR_DEVICES, StorePart, set_status
from store.leases import stale


class Claims(StorePart):
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
            self.write_lock(s)
            now = db_now(s)
            mine = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
            why = "unknown job" if mine is None else f"already {mine.status}" if mine.status in TERMINAL else None
            taken = None
            if mine is not None and mine.status in ("running", "cancelling"):
                if not stale(mine.heartbeat_at, now, lease_seconds):
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
        with self.sessions() as s:
            return s.scalars(select(Job).where(Job.id == taken_id)).first(), token

    def _fair_candidate(self, session, job_id: str, tried: set[str], devices: int | None = None) -> Job | None:
        """The next job to start: among claimable jobs (a job whose message never reached the broker
        waits for it, unless this is its message), the owner with the fewest running jobs first, then
        the owner whose latest job started longest ago (so one worker alternates owners), then the
        oldest job. Locked with SKIP LOCKED on PostgreSQL: concurrent claimers take different jobs.
        `devices`: only jobs needing exactly that many (a slot's class); None: any."""
        def claimable_in(table):
            return and_(waiting_to_start(job_id, table), table.id.not_in(tried) if tried else true(),
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
            self.write_lock(s)
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
            waiting = s.scalar(select(Job.id).where(waiting_to_start(job_id), Job.devices == need).limit(1))
        return need if waiting is not None else None

    def _take(self, session, job: Job, token: str, now: dt.datetime, max_attempts: int, worker: str | None
              ) -> Job | None:
        """Claim one locked candidate, or settle it (cancelled / too many failed attempts) and return None."""
        if job.cancel_requested:
            set_status(session, job, "cancelled", "cancelled before it (re)started")
            job.lease_token = None
            return None
        failed = job.attempt - (job.preemptions or 0)
        if failed >= max_attempts:
            job.error_code, job.error_message = "too_many_attempts", f"gave up after {failed} failed attempts"
            set_status(session, job, "failed", job.error_message)
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


def waiting_to_start(job_id: str, table=Job):
    """Waiting to start: a job whose message never reached the broker waits for it, unless this is its message.
    `table`: Job or an alias of it."""
    return and_(table.status.in_(CLAIMABLE),
                or_(table.error_code.is_(None), table.error_code != UNDISPATCHED, table.id == job_id))
