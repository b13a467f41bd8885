"""Checkpoint rows: a job's resume checkpoint (one, replaced as it trains) and its exports.

The files are the artifact store's (store/artifacts.py); a row is what makes one visible.
"""

from __future__ import annotations

from sqlalchemy import select

from store.db import Checkpoint, Event
from store.job_state import StorePart, lock_job_events
from store.leases import fence


class Checkpoints(StorePart):
    def add_checkpoint(self, job_id: str, kind: str, step: int, filename: str, sha256: str, size: int,
                       metrics: dict | None = None, token: str | None = None) -> Checkpoint:
        """`token`: a worker's lease; the row is refused (LeaseLost) once the lease is lost. A resume
        row replaces the job's previous one; `row.replaced` lists the files no row points to any more."""
        replaced = []
        with self.sessions.begin() as s:
            lock_job_events(s, job_id)  # first: before the checkpoint row's foreign-key lock on the job
            if token is not None:
                fence(s, job_id, token)
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
