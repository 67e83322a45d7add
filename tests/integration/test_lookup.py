"""Pending tasks looked up, counted and rescheduled, from the journal of a real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from rmqdelay import (
    BrokerUnavailableError,
    InvalidKeyError,
    InvalidQueryError,
    InvalidTaskError,
    JournalUnavailableError,
    Scheduler,
    Settings,
    SyncScheduler,
    TaskDueTooSoonError,
    TaskNotPendingError,
    TaskSpec,
)
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import DUE_MS, KEYS, PUBLISHED_MS, TASK_ID

from .conftest import apply, make_settings
from .helpers import Recorder, running_worker
from .proxy import Proxy

pytestmark = pytest.mark.integration


def key() -> str:
    return f"incident:{uuid.uuid4().hex[:8]}"


async def test_get_and_find_list_what_is_pending_and_nothing_that_ran_or_was_cancelled(
    own_settings: Settings,
) -> None:
    recorder, incident = Recorder(), key()
    async with (
        running_worker(own_settings, "dest", recorder) as worker,
        Scheduler(own_settings) as scheduler,
    ):
        later = await scheduler.schedule("dest", {"step": "escalate"}, delay=600, keys=[incident])
        sooner = await scheduler.schedule("dest", {"step": "remind"}, delay=300, keys=[incident])
        other = await scheduler.schedule("dest", {"step": "other"}, delay=900)
        runs = await scheduler.schedule("dest", {"step": "now"}, delay=0.3)
        doomed = await scheduler.schedule("dest", {"step": "doomed"}, delay=600)
        await scheduler.cancel(doomed.id)
        await recorder.wait_for({runs.id}, within=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.executed == 1)

        found = await scheduler.get(later.id)
        assert found is not None
        assert (found.id, found.destination, found.keys) == (later.id, "dest", (incident,))
        assert abs((found.due_at - later.due_at).total_seconds()) < 0.001  # whole ms
        assert (found.attempt, found.size, found.body) == (1, 19, b'{"step":"escalate"}')
        assert found.content_type == "application/json"
        assert found.properties["message_id"] == later.id
        assert await scheduler.get(runs.id) is None  # ran
        assert await scheduler.get(doomed.id) is None  # cancelled
        assert await scheduler.get("never-scheduled") is None

        page = await scheduler.find()
        assert [t.id for t in page.tasks] == [sooner.id, later.id, other.id]  # by due time
        assert page.cursor is None
        under = await scheduler.find(key=incident)
        assert [t.id for t in under.tasks] == [sooner.id, later.id]
        soon = await scheduler.find(due_before=datetime.now(UTC) + timedelta(seconds=450))
        assert [t.id for t in soon.tasks] == [sooner.id]
        late = await scheduler.find(due_after=datetime.now(UTC) + timedelta(seconds=450))
        assert [t.id for t in late.tasks] == [later.id, other.id]
        assert (await scheduler.find(destination="elsewhere")).tasks == []

        first = await scheduler.find(limit=2)
        assert [t.id for t in first.tasks] == [sooner.id, later.id]
        assert first.cursor is not None
        rest = await scheduler.find(limit=2, cursor=first.cursor)
        assert ([t.id for t in rest.tasks], rest.cursor) == ([other.id], None)


async def test_tasks_published_by_other_clients_are_found_with_their_properties(
    own_settings: Settings,
) -> None:
    """The wire format is all the journal needs: a task another client published, keys as
    the wire format says (the array, and its JSON copy), keeps its own properties."""
    due = time.time_ns() // 1_000_000 + 600_000
    task_id, incident = uuid.uuid4().hex, key()
    headers: dict[str, Any] = {
        TASK_ID: task_id,
        DUE_MS: due,
        PUBLISHED_MS: due - 600_000,
        KEYS: [incident],
        "rmqdelay-keys-json": f'["{incident}"]',
        "rmqdelay-route-in": "work",
        "tenant": "acme",
    }
    connection = await aio_pika.connect(own_settings.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(own_settings.names.schedule_exchange)
        await exchange.publish(
            aio_pika.Message(
                b"\x00\x01binary",
                headers=headers,
                content_type="application/octet-stream",
                correlation_id="corr-7",
                app_id="billing",
                delivery_mode=2,
            ),
            routing_key="dest",
        )
    async with Scheduler(own_settings) as scheduler:
        found = await scheduler.get(task_id)
    assert found is not None
    assert found.body == b"\x00\x01binary"
    assert found.keys == (incident,)
    assert found.headers["tenant"] == "acme"
    assert {k: found.properties[k] for k in ("correlation_id", "app_id")} == {
        "correlation_id": "corr-7",
        "app_id": "billing",
    }


async def test_cancel_can_say_how_many_pending_tasks_it_hit(own_settings: Settings) -> None:
    incident = key()
    async with Scheduler(own_settings) as scheduler:
        for delay in (300, 600):
            await scheduler.schedule("dest", {}, delay=delay, keys=[incident])
        assert (await scheduler.cancel(incident, count=True)).pending == 2
        assert (await scheduler.cancel(incident, count=True)).pending == 0
        assert (await scheduler.cancel(incident)).pending is None


async def test_bad_queries_are_refused_naming_the_value(own_settings: Settings) -> None:
    async with Scheduler(own_settings) as scheduler:
        with pytest.raises(InvalidQueryError, match="limit must be an integer from 1 to 1000"):
            await scheduler.find(limit=0)
        with pytest.raises(InvalidQueryError, match="cursor 'bogus' is not one"):
            await scheduler.find(cursor="bogus")
        with pytest.raises(InvalidQueryError, match="naive"):
            await scheduler.find(due_before=datetime(2030, 1, 1))
        with pytest.raises(InvalidQueryError, match="destination"):
            await scheduler.find(destination="a b")


async def test_without_the_journal_lookups_say_why(broker_url: str) -> None:
    settings = make_settings(broker_url, journal=False)
    async with Scheduler(settings) as scheduler:
        with pytest.raises(JournalUnavailableError, match="RMQDELAY_JOURNAL is false"):
            await scheduler.get("x")
        with pytest.raises(JournalUnavailableError):
            await scheduler.cancel("x", count=True)


async def test_reschedule_moves_a_task_later_or_earlier_and_only_the_new_time_runs(
    own_settings: Settings,
) -> None:
    recorder, incident = Recorder(), key()
    async with (
        running_worker(own_settings, "dest", recorder) as worker,
        Scheduler(own_settings) as scheduler,
    ):
        earlier = await scheduler.schedule("dest", {"n": 1}, delay=600, keys=[incident])
        later = await scheduler.schedule("dest", {"n": 2}, delay=1.5)
        moved_up = await scheduler.reschedule(incident, delay=0.5)  # by its one key
        pushed = await scheduler.reschedule(later.id, delay=3)
        assert (moved_up.id, moved_up.keys) == (earlier.id, (incident,))
        await recorder.wait_for({earlier.id, later.id}, within=15)
        async with asyncio.timeout(10):  # both old copies come due, or came, and are skipped
            await worker.wait_for(lambda s: s.cancelled == 1)
        assert (await scheduler.get(earlier.id)) is None
    assert recorder.counts == {earlier.id: 1, later.id: 1}
    ran = {task.id: at for task, at in recorder.runs}
    assert ran[later.id] >= pushed.due_at.timestamp()  # not at its old time
    assert ran[earlier.id] >= moved_up.due_at.timestamp()
    assert [task.payload for task, _ in recorder.runs if task.id == earlier.id] == [{"n": 1}]


async def test_reschedule_refuses_what_it_cannot_move(own_settings: Settings) -> None:
    incident = key()
    async with Scheduler(own_settings) as scheduler:
        with pytest.raises(TaskNotPendingError, match="no pending task has id or key"):
            await scheduler.reschedule("nothing-here", delay=60)
        for _ in range(2):
            await scheduler.schedule("dest", {}, delay=600, keys=[incident])
        with pytest.raises(InvalidKeyError, match="has 2 pending tasks"):
            await scheduler.reschedule(incident, delay=60)
        soon = await scheduler.schedule("dest", {}, delay=0.8)
        with pytest.raises(TaskDueTooSoonError, match="runs as scheduled"):
            await scheduler.reschedule(soon.id, delay=60)
        await scheduler.recurring("dest", {}, key=f"series-{incident}", every=3600)
        with pytest.raises(InvalidTaskError, match="occurrence of series"):
            await scheduler.reschedule(f"series-{incident}", delay=60)
        await scheduler.remove_series(f"series-{incident}")


async def test_a_reschedule_racing_the_due_time_runs_each_task_exactly_once(
    own_settings: Settings,
) -> None:
    """Reschedules fired across the last second and a half before the due time: each is
    either refused (the task runs when it was due) or moves the task (the old copy is
    skipped, the new one runs); never both, never neither."""
    recorder, count = Recorder(), 24
    async with (
        running_worker(own_settings, "dest", recorder) as worker,
        Scheduler(own_settings) as scheduler,
    ):
        due = datetime.now(UTC) + timedelta(seconds=3)
        tasks = [await scheduler.schedule("dest", {"i": i}, at=due) for i in range(count)]

        async def move(i: int) -> datetime | None:
            # From 1.5 s before the due time to 0.35 s before, 50 ms apart.
            fire_at = due.timestamp() - 1.5 + i * 0.05
            await asyncio.sleep(max(0.0, fire_at - time.time()))
            try:
                return (await scheduler.reschedule(tasks[i].id, delay=1.0)).due_at
            except TaskDueTooSoonError:
                return None

        moved = await asyncio.gather(*(move(i) for i in range(count)))
        n_moved = sum(1 for m in moved if m is not None)
        assert 0 < n_moved < count, moved  # the race straddled the margin
        async with asyncio.timeout(20):
            await worker.wait_for(lambda s: s.executed == count and s.cancelled == n_moved)
    assert recorder.counts == {t.id: 1 for t in tasks}
    ran = {task.id: at for task, at in recorder.runs}
    for task, new_due in zip(tasks, moved, strict=True):
        assert ran[task.id] >= (new_due or task.due_at).timestamp()  # never early


def test_the_sync_scheduler_looks_up_and_reschedules(own_settings: Settings) -> None:
    incident = key()
    with SyncScheduler(own_settings) as scheduler:
        task = scheduler.schedule("dest", {"x": 1}, delay=600, keys=[incident])
        assert [t.id for t in scheduler.find(key=incident).tasks] == [task.id]
        moved = scheduler.reschedule(task.id, delay=1200)
        found = scheduler.get(task.id)
        assert found is not None
        assert found.due_at > task.due_at + timedelta(seconds=500)
        assert abs((moved.due_at - found.due_at).total_seconds()) < 0.001
        assert scheduler.cancel(incident, count=True).pending == 1


async def test_a_followed_journal_answers_from_memory_and_is_never_behind(
    own_settings: Settings,
) -> None:
    """follow_journal(): lookups see every task and cancel confirmed before them, show
    whole payloads (read back by offset) and reschedule, without reading the journal."""
    incident = key()
    async with Scheduler(own_settings) as scheduler:
        before = await scheduler.schedule("dest", {"n": 1}, delay=600, keys=[incident])
        await scheduler.follow_journal()
        after = await scheduler.schedule("dest", {"n": 2}, delay=700, keys=[incident])
        page = await scheduler.find(key=incident)
        assert [t.id for t in page.tasks] == [before.id, after.id]
        shown = await scheduler.get(after.id)
        assert shown is not None
        assert shown.body == b'{"n":2}'
        await scheduler.cancel(before.id)
        assert [t.id for t in (await scheduler.find(key=incident)).tasks] == [after.id]
        moved = await scheduler.reschedule(incident, delay=900)
        again = await scheduler.get(after.id)
        assert again is not None
        assert abs((again.due_at - moved.due_at).total_seconds()) < 0.001
        assert again.body == b'{"n":2}'


async def test_a_followed_journal_resumes_after_its_connection_drops(
    own_settings: Settings,
) -> None:
    """Cut while following: the index reconnects (both streams) and then sees what was
    scheduled and cancelled while it was away."""
    async with Proxy(own_settings.url) as proxy, Scheduler(own_settings) as direct:
        via_proxy = make_settings(
            proxy.url, namespace=own_settings.namespace, max_delay=own_settings.max_delay
        )
        first = await direct.schedule("dest", {}, delay=600)
        async with Scheduler(via_proxy) as follower:
            await follower.follow_journal(wait=True)
            assert [t.id for t in (await follower.find()).tasks] == [first.id]
            proxy.cut()
            second = await direct.schedule("dest", {}, delay=700)
            await direct.cancel(first.id)
            async with asyncio.timeout(30):
                while True:
                    try:
                        page = await follower.find()
                        break
                    except BrokerUnavailableError:  # still reconnecting
                        await asyncio.sleep(0.1)
            assert [t.id for t in page.tasks] == [second.id]
        assert proxy.connections >= 4, "the journal's and the cancels' connections came back"


async def test_lookups_racing_new_records_never_break_the_shared_connection(
    own_settings: Settings,
) -> None:
    """A journal read on the scheduler's connection sees records after the one it waits
    for. An ack of those sent after its channel closed is a connection error on the broker
    (504 "expected 'channel.open'"), which takes the scheduler's publishing down with it:
    CI saw that once. Many reads while records keep coming, and the connection stays up."""
    async with Scheduler(own_settings) as scheduler:
        connection = scheduler.connection
        lost: list[object] = []
        connection.close_callbacks.add(lambda _, exc=None: lost.append(exc))
        stop = asyncio.Event()

        async def keep_scheduling() -> int:
            n = 0
            while not stop.is_set():
                await scheduler.schedule_many(
                    [TaskSpec("dest", {"n": i}, delay=3000) for i in range(20)]
                )
                n += 20
            return n

        writer = asyncio.create_task(keep_scheduling())
        try:
            for _ in range(3):
                pages = await asyncio.gather(*(scheduler.find(limit=5) for _ in range(10)))
                assert all(len(page.tasks) == 5 for page in pages)
        finally:
            stop.set()
            scheduled = await writer
        assert scheduled > 0
        assert lost == []
        assert not connection.is_closed
        # The connection still publishes (a 504 would have closed it under us).
        await scheduler.schedule("dest", {"after": True}, delay=3000)


@pytest.mark.parametrize("journal_soon", [False, True])
async def test_a_task_due_within_the_hold_window_is_listed_only_with_journal_soon(
    broker_url: str, journal_soon: bool
) -> None:
    """By default a task due within the hold window goes straight to its work queue and
    the journal never sees it; RMQDELAY_JOURNAL_SOON sends it through the schedule
    exchange, and it is listed until it is due (and still runs)."""
    settings = make_settings(
        broker_url, hold_window=timedelta(seconds=16), journal_soon=journal_soon
    )
    await apply(settings, build_topology(settings.layout, ("dest",)))
    recorder = Recorder()
    try:
        async with running_worker(settings, "dest", recorder), Scheduler(settings) as scheduler:
            task = await scheduler.schedule("dest", {"soon": True}, delay=3, keys=["soon:1"])
            assert task.hops == 0
            found = await scheduler.get(task.id)
            assert (found is not None) is journal_soon
            assert [t.id for t in (await scheduler.find(key="soon:1")).tasks] == (
                [task.id] if journal_soon else []
            )
            await recorder.wait_for({task.id}, within=15)
        assert recorder.lateness_ms()[task.id] >= 0
    finally:
        await apply(settings, build_topology(settings.layout, ("dest",)), delete=True)
