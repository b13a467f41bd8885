"""Per-owner storage quotas: bytes and count of uploaded weights, uploaded datasets and job artifacts.

Why: every upload and every job's checkpoints take space the operator pays for, and without a cap one
owner could fill the disk or the bucket. Usage is summed from the rows (an upload's size is recorded
when it is stored, a checkpoint's or export's by the worker that wrote it), and checked inside the
transaction that adds the row, after the owner's lock row (store/job_state.lock_owners), so concurrent
uploads or submissions can't overshoot. Job artifacts grow after a job is accepted: their byte quota
refuses new jobs once it is reached (a running job is never stopped for it), their count is the jobs
the owner keeps (deleting a job frees its place and its bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from store.db import Checkpoint, DatasetRecord, Job, WeightsRecord

KINDS = ("weights", "datasets", "artifacts")
COUNTED = {"weights": "files", "datasets": "files", "artifacts": "jobs"}


@dataclass(frozen=True)
class Quota:
    max_bytes: int | None  # None: no quota
    max_count: int | None


@dataclass(frozen=True)
class Usage:
    kind: str
    bytes: int
    count: int
    quota: Quota

    def as_json(self) -> dict:
        return {"bytes": self.bytes, "count": self.count, "counts": COUNTED[self.kind],
                "max_bytes": self.quota.max_bytes, "max_count": self.quota.max_count}


class QuotaExceeded(Exception):
    """Adding `adding_bytes` / `adding_count` would take the owner past `usage.quota`."""

    def __init__(self, usage: Usage, adding_bytes: int, adding_count: int, over: str):
        self.usage, self.adding_bytes, self.adding_count, self.over = usage, adding_bytes, adding_count, over
        super().__init__(f"{usage.kind} quota: {over}")


def quotas(settings) -> dict[str, Quota]:
    """The quotas of each kind, from the settings (store/settings.py `quota_*`)."""
    return {kind: Quota(getattr(settings, f"quota_{kind}_bytes"), getattr(settings, f"quota_{kind}_count"))
            for kind in KINDS}


def used(session, owner: str, kind: str) -> tuple[int, int]:
    """(bytes, count) the owner holds of `kind`, read in the caller's session."""
    if kind == "artifacts":
        size = session.scalar(select(func.coalesce(func.sum(Checkpoint.size), 0))
                              .join(Job, Job.id == Checkpoint.job_id).where(Job.owner == owner))
        count = session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner))
        return int(size or 0), int(count or 0)
    record = {"weights": WeightsRecord, "datasets": DatasetRecord}[kind]
    size, count = session.execute(select(func.coalesce(func.sum(record.size), 0), func.count())
                                  .where(record.owner == owner)).one()
    return int(size or 0), int(count or 0)


def check(session, owner: str, kind: str, quota: Quota, adding_bytes: int, adding_count: int = 1) -> None:
    """QuotaExceeded when the owner's `kind` plus this addition would pass the quota. Call after the
    owner's lock row. Anything added takes at least a byte, so an owner exactly at the byte quota (or
    whose jobs' artifacts reached it) adds nothing more."""
    size, count = used(session, owner, kind)
    usage = Usage(kind, size, count, quota)
    if quota.max_count is not None and count + adding_count > quota.max_count:
        raise QuotaExceeded(usage, adding_bytes, adding_count, f"{count:,} of {quota.max_count:,} "
                                                               f"{COUNTED[kind]} kept")
    if quota.max_bytes is not None and size + max(adding_bytes, 1) > quota.max_bytes:
        raise QuotaExceeded(usage, adding_bytes, adding_count, f"{size:,} of {quota.max_bytes:,} bytes used")


def usage(sessions, owner: str, limits: dict[str, Quota]) -> dict[str, Usage]:
    """What the owner holds of each kind, against its quota (`GET /v1/usage`)."""
    with sessions() as s:
        return {kind: Usage(kind, *used(s, owner, kind), limits[kind]) for kind in KINDS}


def precheck(sessions, owner: str, kind: str, quota: Quota, adding_bytes: int, adding_count: int = 1) -> None:
    """`check` without the owner's lock: an early answer before an upload's body is read (the
    transaction that adds the row checks again, exactly)."""
    with sessions() as s:
        check(s, owner, kind, quota, adding_bytes, adding_count)
