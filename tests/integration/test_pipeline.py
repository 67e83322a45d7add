"""The delay pipeline against a real broker: order, exactness, routing failures."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from rmqdelay import (
    InvalidDelayError,
    InvalidDestinationError,
    InvalidPayloadError,
    Scheduler,
    Settings,
    TaskSpec,
    TopologyMismatchError,
    UnroutableError,
)
from rmqdelay.broker.journal import read_journal
from rmqdelay.core.routes import shard_of
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import ROUTE_IN, TASK_ID, route_header, route_headers, task_headers

from .conftest import apply, make_settings
from .helpers import Recorder, depth, get_all, logged, running_worker

pytestmark = pytest.mark.integration


async def test_mixed_delays_in_reverse_order_arrive_in_due_order_and_none_early(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    delays_ms = [3000, 2000, 1500, 1000, 700, 400, 200, 100, 30, 0]
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        scheduled = [
            await scheduler.schedule(destination, {"ms": ms}, delay=timedelta(milliseconds=ms))
            for ms in delays_ms
        ]
        await recorder.wait_for({s.id for s in scheduled}, within=15)
    order = [task.payload["ms"] for task, _ in recorder.runs]
    assert order == sorted(delays_ms)
    lateness = recorder.lateness_ms()
    assert min(lateness.values()) >= 0, lateness
    assert max(lateness.values()) < 1000, "one task waited behind another"


async def test_thousand_random_delays_up_to_5s_all_execute_exactly_once(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    rng = random.Random(7)
    delays = [rng.uniform(0, 5) for _ in range(1000)]
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        scheduled = await asyncio.gather(
            *(scheduler.schedule(destination, {"i": i}, delay=d) for i, d in enumerate(delays))
        )
        ids = {s.id for s in scheduled}
        assert len(ids) == 1000
        await recorder.wait_for(ids, within=40)
    assert recorder.ids == ids
    assert set(recorder.counts.values()) == {1}, "some task ran more than once"
    lateness = recorder.lateness_ms()
    assert min(lateness.values()) >= 0, "a task ran before its due time"


async def test_unknown_destination_raises_naming_it_and_sends_nothing(settings: Settings) -> None:
    async with Scheduler(settings) as scheduler:
        with pytest.raises(UnroutableError, match="'nobody-home'") as info:
            await scheduler.schedule("nobody-home", {"x": 1}, delay=timedelta(seconds=1))
        assert info.value.destination == "nobody-home"
        # The scheduler is still usable afterwards (the probe used a throwaway channel).
        with pytest.raises(UnroutableError):
            await scheduler.schedule("nobody-home", {"x": 1}, delay=0)
        # Nothing entered the levels: the journal, which copies whatever does, has no such
        # task (the levels themselves hold other tests' tasks of this shared namespace).
        index = await read_journal(settings, scheduler.connection)
        assert [e for e in index.all() if e.destination == "nobody-home"] == []


async def test_declare_destination_lets_tasks_wait_for_a_later_worker(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"early": True}, delay=0.05)
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({s.id}, within=10)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"delay": -1}, InvalidDelayError, "negative"),
        ({"delay": float("nan")}, InvalidDelayError, "finite"),
        ({"delay": float("inf")}, InvalidDelayError, "finite"),
        ({"delay": timedelta(days=3654)}, InvalidDelayError, "exceeds the maximum"),
        ({}, InvalidDelayError, "exactly one"),
        ({"delay": 1, "at": datetime.now(UTC)}, InvalidDelayError, "exactly one"),
        ({"at": datetime(2030, 1, 1)}, InvalidDelayError, "naive"),
        ({"delay": 1, "payload": {1, 2}}, InvalidPayloadError, "set"),
        ({"delay": 1, "payload": b"raw"}, InvalidPayloadError, "content_type"),
        ({"delay": 1, "destination": ""}, InvalidDestinationError, "non-empty"),
        ({"delay": 1, "destination": "x" * 300}, InvalidDestinationError, "bytes"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_sent(
    settings: Settings, destination: str, kwargs: dict[str, object], error: type, fragment: str
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        args = {"destination": destination, "payload": {"ok": 1}, **kwargs}
        with pytest.raises(error, match=fragment):
            await scheduler.schedule(args.pop("destination"), args.pop("payload"), **args)  # type: ignore[arg-type]
    assert await depth(settings, settings.names.work_queue(destination)) == 0
    assert await depth(settings, settings.names.level_queue(0)) == 0


async def test_past_due_time_is_delivered_at_once(settings: Settings, destination: str) -> None:
    recorder = Recorder()
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        s = await scheduler.schedule(destination, {}, at=datetime.now(UTC) - timedelta(hours=1))
        assert s.hops == 0
        await recorder.wait_for({s.id}, within=5)


async def _publish_raw(settings: Settings, destination: str, headers: dict[str, object]) -> None:
    """Publish as another language's client would, bypassing the Scheduler."""
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.names.schedule_exchange, ensure=False)
        message = aio_pika.Message(b"{}", headers=headers, content_type="application/json")
        await exchange.publish(message, routing_key=destination)


async def test_malformed_hop_plans_are_caught_as_unroutable_and_do_not_stall_their_level(
    settings: Settings, destination: str
) -> None:
    """Under at-least-once, unroutable dead-letters stay in the broker's dead-letter window
    (32 messages by default); once it is full the level stops expiring anything. Seen on
    3.10.8 with the alternate exchange removed: this test then times out."""
    recorder = Recorder()
    bad_ids = [f"malformed-{i}" for i in range(40)]
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        for task_id in bad_ids:
            bad = {
                **task_headers(task_id, due_ms=0, published_ms=0, route=route_headers(())),
                ROUTE_IN: "1",
                route_header(1): "7",  # a level above: no binding matches
            }
            await _publish_raw(settings, destination, bad)
        two_units = timedelta(milliseconds=2 * settings.resolution_ms)
        after = await scheduler.schedule(destination, {}, delay=two_units)
        await recorder.wait_for({after.id}, within=10)  # through level 1, behind the bad ones
    unroutable = await get_all(settings, settings.names.unroutable, ack=True)
    # A set: 3.10.8 dead-letters some of an overflowed window twice (at-least-once allows it).
    assert {m.headers[TASK_ID] for m in unroutable} == set(bad_ids)
    assert {m.routing_key for m in unroutable} == {destination}


async def test_destination_gone_at_fire_time_lands_in_unroutable_queue(
    settings: Settings, destination: str
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"v": 1}, delay=timedelta(milliseconds=300))
    await apply(settings, _work_queue_only(settings, destination), delete=True)
    found: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(10):
        while not any(m.headers[TASK_ID] == s.id for m in found):
            await asyncio.sleep(0.1)  # polling the broker: there is no event to await
            found += await get_all(settings, settings.names.unroutable, ack=True)
    mine = [m for m in found if m.headers[TASK_ID] == s.id]
    assert mine[0].routing_key == destination
    assert mine[0].headers["x-death"][0]["queue"].startswith(settings.names.level_queue(0)[:-2])


def _work_queue_only(settings: Settings, destination: str):  # type: ignore[no-untyped-def]
    from rmqdelay.core.topology import destination_topology

    return destination_topology(settings.layout, destination)


async def test_other_resolution_on_an_existing_namespace_is_a_clear_mismatch(
    broker_url: str,
) -> None:
    settings = make_settings(broker_url, max_delay=timedelta(hours=1))
    await apply(settings, build_topology(settings.layout))
    other = settings.model_copy(update={"resolution_ms": 5})
    try:
        with pytest.raises(TopologyMismatchError, match=r"x-message-ttl.*resolution"):
            async with Scheduler(other):
                pass
    finally:  # the refused declare made the exchanges of the levels it would add
        for layout in (other.layout, settings.layout):
            await apply(settings, build_topology(layout), delete=True)


async def test_classic_queues_work_too(broker_url: str) -> None:
    settings = make_settings(broker_url, queue_type="classic", max_delay=timedelta(hours=1))
    recorder = Recorder()
    try:
        async with running_worker(settings, "c", recorder), Scheduler(settings) as scheduler:
            s = [await scheduler.schedule("c", {}, delay=d) for d in (0.3, 0.1, 0)]
            await recorder.wait_for({x.id for x in s}, within=10)
        assert [t.id for t, _ in recorder.runs] == [x.id for x in reversed(s)]
    finally:
        await apply(settings, build_topology(settings.layout, ("c",)), delete=True)


async def test_schedule_many_confirms_every_task_of_a_batch_and_all_run_in_due_order(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    specs = [
        TaskSpec(destination, {"i": i}, delay=timedelta(milliseconds=900 - 100 * i))
        for i in range(8)
    ]
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        scheduled = await scheduler.schedule_many(specs)
        assert [s.destination for s in scheduled] == [destination] * 8
        await recorder.wait_for({s.id for s in scheduled}, within=15)
    assert min(recorder.lateness_ms().values()) >= 0
    started = [task.payload["i"] for task, _ in sorted(recorder.runs, key=lambda run: run[1])]
    assert started == list(range(7, -1, -1))


async def test_schedule_many_refuses_the_whole_batch_for_one_bad_task(
    settings: Settings, destination: str
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        with pytest.raises(InvalidDelayError, match="task 1 of the batch: delay must not be"):
            await scheduler.schedule_many(
                [TaskSpec(destination, {}, delay=0), TaskSpec(destination, {}, delay=-1)]
            )
        assert await scheduler.schedule_many([]) == []
    assert await depth(settings, settings.names.work_queue(destination)) == 0


async def test_queues_created_without_or_with_other_placement_are_kept_not_refused(
    broker_url: str,
) -> None:
    # Queues from before placement arguments, and one created with 3 replicas: clients
    # with 3 and 2 replicas work on both (declaring or verifying), as placement applies
    # only to new queues; a difference that matters (another resolution's TTLs) is refused.
    settings = make_settings(broker_url, max_delay=timedelta(hours=1))
    topology = build_topology(settings.layout, ("d",))
    unplaced = tuple(replace(q, placement={}) for q in topology.queues)
    await apply(settings, replace(topology, queues=unplaced))
    await apply(settings, build_topology(settings.layout, ("other",)))
    recorder = Recorder()
    try:
        for replicas, destination, said in (
            (3, "d", "created without placement"),
            (2, "other", "exists with placement other than"),
        ):
            new = settings.model_copy(update={"replicas": replicas})
            with logged("rmqdelay.broker.declare", said) as kept:
                async with Scheduler(new) as scheduler, running_worker(new, destination, recorder):
                    s = await scheduler.schedule(destination, {}, delay=0.2)
                    await recorder.wait_for({s.id}, within=20)
                verifying = new.model_copy(update={"declare": False})
                async with Scheduler(verifying) as scheduler:
                    await scheduler.schedule(destination, {}, delay=0)
            assert kept.is_set(), said
        other = settings.model_copy(update={"resolution_ms": 5})
        with pytest.raises(TopologyMismatchError, match=r"x-message-ttl"):
            async with Scheduler(other):
                pass
    finally:
        await apply(settings, build_topology(settings.layout, ("d", "other")), delete=True)
        # the refused declare at 5 ms made the exchanges of the levels it would add
        finer = settings.model_copy(update={"resolution_ms": 5})
        await apply(settings, build_topology(finer.layout), delete=True)


async def test_shards_each_deliver_their_tasks_on_time(broker_url: str) -> None:
    settings = make_settings(broker_url, shards=3, max_delay=timedelta(hours=1))
    topology = build_topology(settings.layout, ("d",))
    recorder = Recorder()
    try:
        async with running_worker(settings, "d", recorder), Scheduler(settings) as scheduler:
            scheduled = [
                await scheduler.schedule("d", {"n": n}, delay=0.5 + (n % 7) * 0.25)
                for n in range(30)
            ]
            await recorder.wait_for({s.id for s in scheduled}, within=30)
        assert {shard_of(s.id, 3) for s in scheduled} == {0, 1, 2}
        assert min(recorder.lateness_ms().values()) >= 0, "none early"
        assert all(s.hops >= 1 for s in scheduled), "every task waited in its shard's levels"
    finally:
        await apply(settings, topology, delete=True)
