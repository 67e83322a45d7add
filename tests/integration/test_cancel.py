"""Cancellation and rescheduling against a real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from rmqdelay import InvalidDelayError, Scheduler, Settings
from rmqdelay.broker.cancels import CancelFollower

from .conftest import make_settings
from .helpers import Recorder, eventually, logged, running_worker
from .proxy import Proxy

pytestmark = pytest.mark.integration


def key() -> str:
    return f"incident:{uuid.uuid4().hex[:8]}"


async def test_cancel_by_id_calls_off_that_task_only(settings: Settings, destination: str) -> None:
    recorder = Recorder()
    async with (
        running_worker(settings, destination, recorder) as worker,
        Scheduler(settings) as scheduler,
    ):
        doomed = await scheduler.schedule(destination, {"n": 1}, delay=0.4)
        kept = await scheduler.schedule(destination, {"n": 2}, delay=0.4)
        cancellation = await scheduler.cancel(doomed.id)
        assert cancellation.key == doomed.id
        await recorder.wait_for({kept.id}, within=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.cancelled == 1)
    assert doomed.id not in recorder.ids


async def test_one_key_cancels_every_task_under_it(settings: Settings, destination: str) -> None:
    recorder, shared, other = Recorder(), key(), key()
    async with (
        running_worker(settings, destination, recorder) as worker,
        Scheduler(settings) as scheduler,
    ):
        doomed = [
            await scheduler.schedule(destination, {}, delay=d, keys=[shared, f"extra-{d}"])
            for d in (0.3, 0.4, 0.5)
        ]
        kept = await scheduler.schedule(destination, {}, delay=0.4, keys=[other])
        await scheduler.cancel(shared)
        await recorder.wait_for({kept.id}, within=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.cancelled == 3)
    assert recorder.ids == {kept.id}
    assert not {d.id for d in doomed} & recorder.ids


async def test_replace_runs_only_the_new_task(settings: Settings, destination: str) -> None:
    recorder, incident = Recorder(), key()
    async with (
        running_worker(settings, destination, recorder) as worker,
        Scheduler(settings) as scheduler,
    ):
        first = await scheduler.schedule(destination, {"v": 1}, delay=0.6, keys=[incident])
        moved = await scheduler.schedule(
            destination, {"v": 2}, delay=0.2, keys=[incident], replace=True
        )
        await recorder.wait_for({moved.id}, within=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.cancelled == 1)
    assert recorder.ids == {moved.id}
    assert first.id not in recorder.ids


async def test_a_key_reused_after_a_cancel_runs(settings: Settings, destination: str) -> None:
    recorder, incident = Recorder(), key()
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        await scheduler.cancel(incident)
        later = await scheduler.schedule(destination, {}, delay=0, keys=[incident])
        await recorder.wait_for({later.id}, within=10)


async def test_cancel_after_the_task_ran_changes_and_breaks_nothing(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    async with (
        running_worker(settings, destination, recorder) as worker,
        Scheduler(settings) as scheduler,
    ):
        ran = await scheduler.schedule(destination, {}, delay=0, keys=["k-" + key()])
        await recorder.wait_for({ran.id}, within=10)
        await scheduler.cancel(ran.id)
        await scheduler.cancel(ran.keys[0])
        after = await scheduler.schedule(destination, {}, delay=0)
        await recorder.wait_for({after.id}, within=10)
    assert recorder.counts[ran.id] == 1
    assert worker.stats.cancelled == 0


async def test_a_worker_started_after_the_cancel_honours_it(
    settings: Settings, destination: str
) -> None:
    """The task is due (in the work queue) before any worker runs; the worker replays."""
    recorder, incident = Recorder(), key()
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        doomed = await scheduler.schedule(destination, {}, delay=0.05, keys=[incident])
        await scheduler.cancel(incident)
        kept = await scheduler.schedule(destination, {}, delay=0.1)
    async with running_worker(settings, destination, recorder) as worker:
        await recorder.wait_for({kept.id}, within=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.cancelled == 1)
    assert doomed.id not in recorder.ids


async def test_a_worker_restarted_between_cancel_and_due_time_honours_it(
    settings: Settings, destination: str
) -> None:
    recorder, incident = Recorder(), key()
    async with Scheduler(settings) as scheduler:
        async with running_worker(settings, destination, recorder):
            doomed = await scheduler.schedule(destination, {}, delay=1.5, keys=[incident])
            await scheduler.cancel(incident)
        async with running_worker(settings, destination, recorder) as worker:
            kept = await scheduler.schedule(destination, {}, delay=1.6)
            await recorder.wait_for({kept.id}, within=10)
            async with asyncio.timeout(10):
                await worker.wait_for(lambda s: s.cancelled == 1)
    assert doomed.id not in recorder.ids


async def test_a_dropped_connection_between_cancel_and_due_time_is_survived(
    settings: Settings, destination: str
) -> None:
    """Cancels issued while the worker is cut off are known before it executes again, and
    its follower resumes from its offset instead of replaying the stream."""
    recorder, incident = Recorder(), key()
    async with Proxy(settings.url) as proxy, Scheduler(settings) as scheduler:
        via_proxy = make_settings(proxy.url, namespace=settings.namespace, declare=False)
        await scheduler.declare_destination(destination)
        for _ in range(20):  # history the follower must not replay after the reconnect
            await scheduler.cancel(key())
        async with running_worker(via_proxy, destination, recorder) as worker:
            follower = worker._follower
            seen_before = follower.records_seen
            assert seen_before >= 21
            doomed = await scheduler.schedule(destination, {}, delay=2.0, keys=[incident])
            proxy.cut()
            await scheduler.cancel(incident)  # while the worker is disconnected
            kept = await scheduler.schedule(destination, {}, delay=2.1)
            await recorder.wait_for({kept.id}, within=30)
            async with asyncio.timeout(10):
                await worker.wait_for(lambda s: s.cancelled == 1)
            # the cancel, and a marker per resync: nothing of the earlier history again
            assert follower.records_seen - seen_before <= 5
        assert proxy.connections >= 4, "both the worker's connections reconnected"
    assert doomed.id not in recorder.ids


async def test_two_workers_on_one_destination_both_honour_a_cancel(
    settings: Settings, destination: str
) -> None:
    recorder, incident = Recorder(), key()
    async with (
        running_worker(settings, destination, recorder, prefetch=1, concurrency=1) as one,
        running_worker(settings, destination, recorder, prefetch=1, concurrency=1) as two,
        Scheduler(settings) as scheduler,
    ):
        doomed = [
            await scheduler.schedule(destination, {}, delay=0.5, keys=[incident]) for _ in range(10)
        ]
        kept = [await scheduler.schedule(destination, {}, delay=0.5) for _ in range(10)]
        await scheduler.cancel(incident)
        await recorder.wait_for({k.id for k in kept}, within=15)
        await eventually(
            lambda: one.stats.cancelled + two.stats.cancelled == 10, 10, "all ten skipped"
        )
    assert one.stats.cancelled > 0
    assert two.stats.cancelled > 0
    assert not {d.id for d in doomed} & recorder.ids


async def test_a_cancel_returning_200ms_before_the_due_time_always_wins(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    async with (
        running_worker(settings, destination, recorder) as worker,
        Scheduler(settings) as scheduler,
    ):
        tasks = [await scheduler.schedule(destination, {}, delay=1.0) for _ in range(20)]
        due = min(t.due_at.timestamp() for t in tasks)
        await asyncio.sleep(max(0.0, due - 0.35 - time.time()))  # pacing up to the deadline
        await asyncio.gather(*(scheduler.cancel(t.id) for t in tasks))
        returned = time.time()
        assert returned <= due - 0.2, "the test machine was too slow to set the precondition"
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.cancelled == 20)
    assert recorder.runs == []


async def test_cancelling_a_key_with_nothing_pending_is_fine(settings: Settings) -> None:
    async with Scheduler(settings) as scheduler:
        c = await scheduler.cancel(key())
    assert abs(c.at.timestamp() - time.time()) < 60
    assert timedelta(0) <= timedelta(seconds=time.time() - c.at.timestamp())


@asynccontextmanager
async def following(settings: Settings) -> AsyncIterator[CancelFollower]:
    """A cancel follower running until the block ends, caught up when it starts."""
    follower, stop = CancelFollower(settings), asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 30)
        yield follower
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_starting_worker_loads_the_newest_snapshot_and_replays_only_the_rest(
    own_settings: Settings,
) -> None:
    async with Scheduler(own_settings) as scheduler:
        before = [key() for _ in range(120)]
        for k in before:
            await scheduler.cancel(k)
        async with following(own_settings) as first:
            assert first.loaded_snapshot is None  # nothing written yet: a full replay
            assert first.records_seen >= len(before)
            assert await first.write_snapshot() == len(before)
            await scheduler.cancel(after := key(), until=timedelta(hours=1))
            # The announcement and the cancel after it reach the follower in stream order.
            await eventually(lambda: first.cancels.cancelled_by([after], 0), 10, "cancel seen")
            assert not first.snapshot_due(), "the snapshot it wrote counts as the newest"
        async with following(own_settings) as second:
            assert second.loaded_snapshot is not None
            assert second.loaded_snapshot[0] == len(before)
            # The tail only: the announcement, the cancel after it, markers.
            assert second.records_seen < 10
            assert all(second.cancels.cancelled_by([k], 0) == k for k in [*before, after])
            until = {k: u for k, _, u in second.cancels.items()}[after]
            assert 3_500_000 <= until - time.time() * 1000 <= 3_700_000


async def test_a_cancel_until_a_time_is_kept_until_then_and_a_past_one_is_refused(
    own_settings: Settings,
) -> None:
    async with Scheduler(own_settings) as scheduler, following(own_settings) as follower:
        soon = key()
        await scheduler.cancel(soon, until=datetime.now(UTC) + timedelta(seconds=2))
        await eventually(lambda: follower.cancels.cancelled_by([soon], 0), 10, "cancel seen")
        assert follower.cancels.expire(int(time.time() * 1000)) == 0
        assert follower.cancels.expire(int(time.time() * 1000) + 3000) == 1
        assert follower.cancels.cancelled_by([soon], 0) is None
        with pytest.raises(InvalidDelayError, match="in the past"):
            await scheduler.cancel(key(), until=datetime.now(UTC) - timedelta(seconds=1))
        with pytest.raises(InvalidDelayError, match="naive"):
            await scheduler.cancel(key(), until=datetime.now())


async def test_without_a_snapshot_stream_a_worker_says_so_and_replays(
    own_settings: Settings,
) -> None:
    # A topology declared before snapshots existed, with RMQDELAY_DECLARE=false clients.
    async with Scheduler(own_settings) as scheduler:
        await scheduler.cancel(k := key())
    connection = await aio_pika.connect(own_settings.url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(own_settings.names.cancel_snapshots)
    with logged("rmqdelay.broker.cancels", "no snapshot stream") as warned:
        async with following(own_settings) as follower:
            assert follower.cancels.cancelled_by([k], 0) == k
            assert not follower.snapshot_due()
    assert warned.is_set()
