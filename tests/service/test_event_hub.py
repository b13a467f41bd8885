"""The stream fan-out hub on a real (SQLite) store: one feed per job, shared by its streams, gone with them."""

from __future__ import annotations

import asyncio

from api.event_hub import EventHub
from helpers.service import JOB
from store.jobs import JobStore


def test_streams_of_a_job_share_one_feed_that_ends_with_the_job_and_goes_with_its_streams(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'hub.db'}")
    job_id = store.create_job(JOB, JOB, 46).id
    reads = []
    original = store.events.list_events

    def counted(*args, **kwargs):
        reads.append(args)
        return original(*args, **kwargs)

    store.events.list_events = counted

    async def scenario():
        hub = EventHub(store, poll_seconds=0.05)
        first, second = hub.subscribe(job_id), hub.subscribe(job_id)
        assert first is second and len(hub.feeds) == 1
        while first.floor is None:
            await first.changed.wait()
        start_floor = first.floor
        store.events.add_events(job_id, [{"type": "message", "message": f"m{i}"} for i in range(3)])
        while len(first.after(start_floor)) < 3:
            await asyncio.wait_for(first.changed.wait(), 5)
        assert [e.message for e in first.after(start_floor)] == ["m0", "m1", "m2"]
        polls = len(reads)
        await asyncio.sleep(0.5)
        assert len(reads) - polls <= 12  # one feed polling every 0.05 s, however many streams
        claimed, token = store.claims.claim(job_id, max_attempts=3, worker="w:1")
        store.leases.finish(claimed.id, token, "succeeded", "done")
        while not first.ended:
            await asyncio.wait_for(first.changed.wait(), 5)
        assert first.events[-1].data == {"status": "succeeded"}
        task = first.task
        hub.unsubscribe(first)
        assert len(hub.feeds) == 1
        hub.unsubscribe(second)
        assert hub.feeds == {}
        await asyncio.sleep(0)
        assert task.done()

    asyncio.run(scenario())


def test_a_feed_forgets_old_events_past_its_buffer(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'hub.db'}")
    job_id = store.create_job(JOB, JOB, 46).id

    async def scenario():
        hub = EventHub(store, poll_seconds=0.05, buffer=10)
        feed = hub.subscribe(job_id)
        while feed.floor is None:
            await feed.changed.wait()
        store.events.add_events(job_id, [{"type": "message", "message": str(i)} for i in range(25)])
        while not feed.events or feed.events[-1].message != "24":
            await asyncio.wait_for(feed.changed.wait(), 5)
        assert len(feed.events) == 10 and feed.floor == feed.ids[0] - 1
        hub.unsubscribe(feed)

    asyncio.run(scenario())
