"""The journal keeper: tasks that wait longer than the journal keeps a record stay
listed, because one worker at a time writes their records again before they expire."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from rmqdelay import Scheduler, Settings
from rmqdelay.broker.cancels import load_cancels
from rmqdelay.broker.connection import connect_once
from rmqdelay.broker.journal import read_journal
from rmqdelay.broker.keeper import JournalKeeper
from rmqdelay.broker.streams import ToTheEnd
from rmqdelay.core import topology
from rmqdelay.core.journal import STREAM_OFFSET, decode_entry
from rmqdelay.core.topology import Layout, QueueSpec, build_topology
from rmqdelay.core.wire import JOURNALED_MS, MARKER

from .conftest import apply, make_settings
from .helpers import Recorder, running_worker

pytestmark = pytest.mark.integration

DAY_S = 86_400


@pytest.fixture
async def week(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of its own whose journal keeps records the default week."""
    settings = make_settings(broker_url)
    assert settings.layout.journal_retention_s == 7 * DAY_S
    await apply(settings, build_topology(settings.layout, ("dest",)))
    yield settings
    await apply(settings, build_topology(settings.layout, ("dest",)), delete=True)


async def test_a_pass_carries_what_would_expire_while_pending_and_nothing_twice(
    week: Settings,
) -> None:
    """A pass half a retention later copies forward the tasks due after their record
    expires, not those due before it nor the cancelled; the copies alone list them with
    their payload, keys and destination; a second pass, or a new keeper, adds nothing."""
    async with Scheduler(week) as scheduler:
        far = await scheduler.schedule("dest", {"n": "far"}, delay=6 * DAY_S, keys=["inc:1"])
        near = await scheduler.schedule("dest", {"n": "near"}, delay=5 * DAY_S)
        gone = await scheduler.schedule("dest", {"n": "gone"}, delay=6 * DAY_S)
        await scheduler.cancel(gone.id)
        before = await scheduler.get(far.id)
        assert before is not None

        later_ms = int((time.time() + 3.5 * DAY_S + 1) * 1000)
        connection = await connect_once(week, raw=True)
        async with connection:
            keeper = JournalKeeper(week, await load_cancels(week))
            done = await keeper.keep_once(connection, later_ms)
            assert (done.read, done.carried) == (3, 1)
            assert done.through is not None
            again = await keeper.keep_once(connection, later_ms)
            assert (again.read, again.carried, again.through) == (0, 0, done.through)
            fresh = JournalKeeper(week, await load_cancels(week))
            assert (await fresh.keep_once(connection, later_ms)).carried == 0

            # As a reader would see the journal once the originals have expired:
            copies = []
            async with ToTheEnd(connection, week.names.journal, done.through + 1) as records:
                async for message in records:
                    headers = message.header.properties.headers or {}
                    if MARKER not in headers:
                        assert headers[JOURNALED_MS] == later_ms
                        copies.append(
                            decode_entry(
                                headers=headers,
                                body=message.body,
                                routing_key=message.routing_key or "",
                                content_type=message.header.properties.content_type,
                                properties={},
                                offset=int(headers[STREAM_OFFSET]),  # type: ignore[arg-type]
                            )
                        )
        assert [c.id for c in copies] == [far.id]
        (copy,) = copies
        assert (copy.destination, copy.keys) == ("dest", ("inc:1",))
        assert copy.published_ms == round(before.published_at.timestamp() * 1000)
        assert copy.due_ms == round(before.due_at.timestamp() * 1000)

        # The index takes the copy (same stamp, later offset) for the same task.
        after = await scheduler.get(far.id)
        assert after == before
        async with await connect_once(week) as reading:
            index = await read_journal(week, reading)
        assert index.get(far.id, int(time.time() * 1000)).offset == copy.offset  # type: ignore[union-attr]
        assert near.id in {e.id for e in index.pending(int(time.time() * 1000))}


async def offset_of(settings: Settings, task_id: str) -> int:
    async with await connect_once(settings, raw=True) as connection:
        entry = (await read_journal(settings, connection)).get(task_id, int(time.time() * 1000))
    assert entry is not None
    return entry.offset


async def first_offset(settings: Settings) -> int:
    """The offset of the oldest record the journal still has."""
    async with (
        await connect_once(settings, raw=True) as connection,
        ToTheEnd(connection, settings.names.journal, "first") as records,
    ):
        async for message in records:
            offset = (message.header.properties.headers or {})[STREAM_OFFSET]
            assert isinstance(offset, int)
            return offset
    raise AssertionError("the journal is empty")


@pytest.fixture
def small_journal_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Journals made now roll a segment every 20 kB: RabbitMQ applies a stream's max-age by
    whole segments when one rolls, so expiry is seen within seconds of the retention.

    Not smaller: with 4 kB segments, RabbitMQ 4.3.6's stream readers crashed now and then
    (``osiris_log:parse_header`` on stale read-ahead data: its 4 kB read-ahead buffer
    outlived a segment switch), and the broker closed the reader's whole connection with
    541 INTERNAL_ERROR (seen in CI). Segments far larger than the read-ahead never
    showed it here."""
    made = topology.journal_spec

    def small(layout: Layout) -> QueueSpec:
        spec = made(layout)
        arguments = {**spec.arguments, "x-stream-max-segment-size-bytes": 20_000}
        return dataclasses.replace(spec, arguments=arguments)

    monkeypatch.setattr(topology, "journal_spec", small)


@pytest.mark.usefixtures("small_journal_segments")
async def test_a_task_outlives_its_journal_record_where_a_worker_keeps_the_journal(
    broker_url: str,
) -> None:
    """Two namespaces with a one-minute journal, a task due in ten minutes in each, and a
    worker in one. Once the retention has dropped the task's first record in both, it is
    listed no more where no worker runs, and still listed (whole: payload and keys) where
    one does, from its copy."""
    kept, unkept = (
        make_settings(broker_url, journal_retention=timedelta(minutes=1)) for _ in range(2)
    )
    for settings in (kept, unkept):
        await apply(settings, build_topology(settings.layout, ("dest",)))
    try:
        async with (
            running_worker(kept, "dest", Recorder()),
            Scheduler(kept) as keeping,
            Scheduler(unkept) as not_keeping,
        ):
            tasks = [
                await scheduler.schedule("dest", {"n": 1}, delay=600, keys=["inc:7"])
                for scheduler in (keeping, not_keeping)
            ]
            original = await offset_of(kept, tasks[0].id)
            async with asyncio.timeout(150):
                while (
                    await first_offset(kept) <= original
                    or (await not_keeping.find(key="inc:7")).tasks
                ):
                    for scheduler in (keeping, not_keeping):  # roll segments
                        await scheduler.schedule("dest", {"pad": "x" * 4000}, delay=1800)
                    await asyncio.sleep(1)  # retention has no event to await
            found = await keeping.get(tasks[0].id)
            assert found is not None
            assert (found.keys, found.body, found.destination) == (("inc:7",), b'{"n":1}', "dest")
            assert (await keeping.find(key="inc:7")).tasks[0].id == tasks[0].id
    finally:
        for settings in (kept, unkept):
            await apply(settings, build_topology(settings.layout, ("dest",)), delete=True)


async def test_one_worker_of_a_fleet_keeps_the_journal_and_another_takes_over(
    broker_url: str,
) -> None:
    """The turn is an exclusive queue: a second worker is refused it while the first
    lives, and takes it within a pass interval once the first has stopped."""
    settings = make_settings(broker_url, journal_retention=timedelta(minutes=1))
    every_s = settings.layout.journal_retention_s / 8
    await apply(settings, build_topology(settings.layout, ("dest",)))
    try:
        async with contextlib.AsyncExitStack() as second_running:
            async with running_worker(settings, "dest", Recorder()) as first:
                assert first.keeper is not None
                async with asyncio.timeout(20):
                    await first.keeper.keeping_now.wait()
                second = await second_running.enter_async_context(
                    running_worker(settings, "dest", Recorder())
                )
                assert second.keeper is not None
                async with asyncio.timeout(20):
                    await second.keeper.refused.wait()
                assert first.keeper.keeping_now.is_set()
                assert not second.keeper.keeping_now.is_set()
            async with asyncio.timeout(every_s + 20):
                await second.keeper.keeping_now.wait()
    finally:
        await apply(settings, build_topology(settings.layout, ("dest",)), delete=True)
