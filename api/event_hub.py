"""Event streams: one shared database poller per streamed job per API process, and per-owner stream caps.

Why: every SSE stream used to poll the database twice a second through the threadpool, so 300 open
streams meant 600 queries a second queued for the pool's threads ahead of every other request (a
`GET /v1/jobs/{id}` waited behind them). Now a job with open streams has one `Feed`: a task that
reads the job's new events (and, when there are none, its status) once per `poll_seconds` and keeps
the recent ones in memory; its streams wait on it. N streams of one job cost one query per interval.
A stream that starts behind the feed's buffer (`after=0`, an old Last-Event-ID, a slow reader)
catches up from the database on its own, page by page, then follows the feed.

The per-job cursor is safe because one job's events commit in id order (store.job_state.lock_job_events).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import defaultdict

from fastapi.concurrency import run_in_threadpool

from store.job_state import TERMINAL
from store.jobs import JobStore

log = logging.getLogger(__name__)
PAGE = 500


class Feed:
    """The recent events of one job: `events` holds every event with id > `floor`, ascending."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.floor: int | None = None  # None until the poller has read the job's newest event id
        self.events: list = []
        self.ids: list[int] = []
        self.ended = False  # the job has ended and every one of its events is in (or before) the buffer
        self.listeners = 0
        self.changed = asyncio.Event()
        self.task: asyncio.Task | None = None

    def after(self, cursor: int) -> list:
        return self.events[bisect.bisect_right(self.ids, cursor):]

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class EventHub:
    def __init__(self, store: JobStore, poll_seconds: float = 0.5, buffer: int = 2000):
        self.store, self.poll_seconds, self.buffer = store, poll_seconds, buffer
        self.feeds: dict[str, Feed] = {}

    def subscribe(self, job_id: str) -> Feed:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(job_id)
            feed.task = asyncio.get_running_loop().create_task(self._poll(feed))
        feed.listeners += 1
        return feed

    def unsubscribe(self, feed: Feed) -> None:
        feed.listeners -= 1
        if feed.listeners <= 0 and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]
            if feed.task is not None:
                feed.task.cancel()

    async def _poll(self, feed: Feed) -> None:
        head = None
        while not feed.ended:
            try:
                if head is None:
                    head = feed.floor = await run_in_threadpool(self.store.events.last_event_id, feed.job_id)
                    feed.notify()
                    continue
                events, ended = await run_in_threadpool(self._read, feed.job_id, head)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database outage: keep the streams, try again
                log.warning("event feed of %s: read failed; retrying", feed.job_id, exc_info=True)
                await asyncio.sleep(max(self.poll_seconds, 2.0))
                continue
            if events:
                head = events[-1].id
                feed.events.extend(events)
                feed.ids.extend(e.id for e in events)
                if len(feed.events) > self.buffer:  # forget the oldest; a stream behind them reads the database
                    cut = len(feed.events) - self.buffer
                    feed.floor = feed.ids[cut - 1]
                    del feed.events[:cut], feed.ids[:cut]
            feed.ended = ended
            if events or ended:
                feed.notify()
            if len(events) < PAGE and not ended:
                await asyncio.sleep(self.poll_seconds)

    def _read(self, job_id: str, after: int) -> tuple[list, bool]:
        """New events after `after`; when there are none, whether the job has ended. The status is read
        before the second look at the events: a job's final status event commits with its status."""
        events = self.store.events.list_events(job_id, after, PAGE)
        if events:
            return events, False
        job = self.store.get_job_view(job_id)
        if job is not None and job.status not in TERMINAL:
            return [], False
        events = self.store.events.list_events(job_id, after, PAGE)
        return events, len(events) < PAGE  # a full page: read on before calling it ended


class StreamSlots:
    """Open event streams per owner in this API process; `acquire` is False past the cap."""

    def __init__(self):
        self.open: dict[str, int] = defaultdict(int)

    def acquire(self, owner: str, cap: int) -> bool:
        if self.open[owner] >= cap:
            return False
        self.open[owner] += 1
        return True

    def release(self, owner: str) -> None:
        self.open[owner] -= 1
        if self.open[owner] <= 0:
            del self.open[owner]
