"""Job events: the status, metrics, eval, mask-update and message lines a job's stream and charts read.

Ids come from one sequence and commit in id order per job (job_state.lock_job_events), so a stream's
cursor (`id > last seen`) never skips one.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, insert, literal_column, or_, select

from store.db import Event, utcnow
from store.job_state import StorePart, lock_job_events
from store.leases import fence


class EventLog(StorePart):
    def add_events(self, job_id: str, events: Iterable[dict], token: str | None = None) -> None:
        """`token`: a worker's lease; its events are refused (LeaseLost) once the lease is lost."""
        rows = [{"job_id": job_id, "type": e["type"], "message": e.get("message", ""), "data": e.get("data"),
                 "level": e.get("level", "info"), "created_at": utcnow()} for e in events]
        if rows:
            with self.engine.begin() as connection:  # one executemany, not an ORM object per event
                lock_job_events(connection, job_id)
                if token is not None:
                    fence(connection, job_id, token)
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
