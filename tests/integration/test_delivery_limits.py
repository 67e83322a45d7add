"""Delivery limits on every RabbitMQ version: nothing is lost by looking at the parking lot
or the unroutable queue, a task is parked only when its workers keep dying, never for
having been held, and namespaces of earlier releases are brought up by their policies."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from rmqdelay import RetryPolicy, Scheduler, Settings, Task
from rmqdelay.broker.declare import apply_topology
from rmqdelay.cli.main import RET_OK, main
from rmqdelay.core.topology import Topology, build_topology
from rmqdelay.core.wire import BROKER_HEADERS
from rmqdelay.tools.parking import ParkingLot, UnroutableQueue

from .conftest import make_settings, management_api, need_management
from .helpers import (
    Recorder,
    depth,
    kill_a_worker_mid_handler,
    logged,
    running_worker,
    strand,
    use_in_cli,
)

pytestmark = pytest.mark.integration

#: More looks than RabbitMQ 4.x's default delivery limit (20) allows returns.
LOOKS = 25


@pytest.fixture
async def limited(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of the test's own whose work queues allow one delivery: the second
    worker that dies holding a task gets it parked by the broker."""
    settings = make_settings(broker_url, max_delay="1h", delivery_limit=1)
    topology = build_topology(settings.layout, ("dest", "gone"))
    await apply_topology(settings, topology)
    yield settings
    await apply_topology(settings, topology, delete=True)


def _no_broker_bookkeeping(task: Task) -> None:
    kept = [k for k in task.headers if k.startswith(BROKER_HEADERS)]
    assert not kept, f"broker headers came along: {kept}"


async def _park_one(settings: Settings) -> str:
    async def broken(task: Task) -> None:
        raise LookupError("no such account")

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with (
        running_worker(settings, "dest", broken, retry=once) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule("dest", {"n": 1}, delay=0)
        async with asyncio.timeout(20):
            await worker.wait_for(lambda st: st.parked == 1)
    return s.id


async def _strand_one(settings: Settings) -> str:
    """A task whose destination's work queue was deleted while it waited."""
    async with Scheduler(settings) as scheduler:
        s = await scheduler.schedule("gone", {"n": 2}, delay=0.3)
        await strand(scheduler, "gone", 1)
    return s.id


async def test_parked_and_unroutable_tasks_survive_any_number_of_looks(
    limited: Settings,
) -> None:
    parked_id, stranded_id = await _park_one(limited), await _strand_one(limited)
    async with Scheduler(limited) as scheduler:
        parked, unroutable = ParkingLot(scheduler), UnroutableQueue(scheduler)
        for _ in range(LOOKS):
            assert [t.id for t in await parked.peek()] == [parked_id]
            assert [t.id for t in await unroutable.peek()] == [stranded_id]
            assert await parked.show(parked_id) is not None
            # 'gone' has no work queue: the requeue is refused and the task stays
            sent, stayed = await unroutable.requeue({stranded_id})
            assert (sent, len(stayed)) == (0, 1)
        assert await parked.count() == 1
        assert await unroutable.count() == 1
        await scheduler.declare_destination("gone")
        assert await parked.requeue(None) == (1, [])
        assert await unroutable.requeue(None) == (1, [])
    recorder = Recorder()
    async with running_worker(limited, "dest", recorder), running_worker(limited, "gone", recorder):
        await recorder.wait_for({parked_id, stranded_id}, within=30)
    for task, _ in recorder.runs:
        _no_broker_bookkeeping(task)
        assert task.attempt == 1


@pytest.mark.timeout(180)
async def test_a_task_whose_workers_keep_dying_is_parked_by_the_limit_and_requeues_cleanly(
    limited: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Scheduler(limited) as scheduler:
        s = await scheduler.schedule("dest", {"poison": False}, delay=0)
    deaths = 0
    while await depth(limited, limited.names.parked) == 0:
        assert deaths < 4, "the work queue's delivery limit of 1 never parked the task"
        assert await kill_a_worker_mid_handler(limited, "dest") == s.id
        deaths += 1
        await asyncio.sleep(0.2)  # the dead-lettering is the broker's, no event to await
    assert deaths == 2, "a delivery limit of 1: parked when the second worker died with it"
    use_in_cli(monkeypatch, limited)
    for _ in range(LOOKS):
        assert await asyncio.to_thread(main, ["parked", "--json"]) == RET_OK
        [listed] = map(json.loads, capsys.readouterr().out.splitlines())
        assert listed["id"] == s.id
    assert "delivery_limit" in listed["reason"]
    assert limited.names.work_queue("dest") in listed["reason"]
    assert await asyncio.to_thread(main, ["parked", "requeue", s.id]) == RET_OK
    recorder = Recorder()
    async with running_worker(limited, "dest", recorder):
        await recorder.wait_for({s.id}, within=20)
    task = recorder.runs[0][0]
    assert task.payload == {"poison": False}
    _no_broker_bookkeeping(task)
    assert await depth(limited, limited.names.parked) == 0


async def test_a_held_task_given_back_at_every_stop_is_never_parked(broker_url: str) -> None:
    # Units of 10 s: a task due in 8 s goes straight to the work queue and the worker
    # holds it until it is due; the work queue allows one delivery.
    settings = make_settings(broker_url, max_delay="1h", resolution_ms=10_000, delivery_limit=1)
    topology = build_topology(settings.layout, ("dest",))
    await apply_topology(settings, topology)
    try:
        async with Scheduler(settings) as scheduler:
            s = await scheduler.schedule("dest", {}, delay=8)
        assert s.hops == 0
        for _ in range(3):  # more stops than the limit allows returns
            async with running_worker(settings, "dest", Recorder()) as worker:
                async with asyncio.timeout(20):
                    await worker.wait_for(lambda st: st.held >= 1)
            assert worker.stats.executed == 0
            assert worker.stats.requeued == 1
        recorder = Recorder()
        async with running_worker(settings, "dest", recorder):
            await recorder.wait_for({s.id}, within=30)
        assert recorder.counts[s.id] == 1
        assert min(recorder.lateness_ms().values()) >= 0, "never early"
        assert await depth(settings, settings.names.parked) == 0
    finally:
        await apply_topology(settings, topology, delete=True)


def _as_an_earlier_release_made_it(topology: Topology) -> Topology:
    """The same topology without the arguments this release added."""
    return dataclasses.replace(
        topology, queues=tuple(dataclasses.replace(q, added={}) for q in topology.queues)
    )


async def test_a_namespace_of_an_earlier_release_is_accepted_and_brought_up_by_its_policies(
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    test_broker_version: tuple[int, int],
) -> None:
    settings = make_settings(broker_url, max_delay="1h")
    need_management(settings)
    topology = build_topology(settings.layout, ("dest",))
    await apply_topology(settings, _as_an_earlier_release_made_it(topology))
    use_in_cli(monkeypatch, settings)
    try:
        with logged("rmqdelay.broker", "made by an earlier rmqdelay") as warned:
            async with Scheduler(settings) as scheduler:
                await scheduler.declare_destination("dest")
        assert warned.is_set()

        def warnings() -> list[str]:
            assert main(["status", "--json"]) == RET_OK
            found: list[str] = json.loads(capsys.readouterr().out)["warnings"]
            return [w for w in found if "delivery limit" in w]

        before = await asyncio.to_thread(warnings)
        if test_broker_version >= (4, 0):  # 20 by default, and nowhere to dead-letter to
            assert any(settings.names.parked in w and "nowhere to dead-letter" in w for w in before)
        else:  # 3.x: parked messages were always safe; workers' deaths were never counted
            assert not any(settings.names.parked in w for w in before)
        assert any(settings.names.work_queue("dest") in w for w in before) == (
            test_broker_version < (4, 0)
        )
        assert await asyncio.to_thread(main, ["declare", "--policies"]) == RET_OK
        assert "aside-delivery-limit" in capsys.readouterr().out
        # The management API samples what a queue reports (every 5 s by default).
        async with asyncio.timeout(30):
            while await asyncio.to_thread(warnings):  # noqa: ASYNC110 - sampled, no event
                await asyncio.sleep(1)
        parked_id = await _park_one(settings)
        async with Scheduler(settings) as scheduler:
            lot = ParkingLot(scheduler)
            for _ in range(LOOKS):
                assert [t.id for t in await lot.peek()] == [parked_id]
    finally:
        await apply_topology(settings, topology, delete=True)
        with management_api(settings) as api:
            for policy in ("work", "aside"):
                api.delete(f"/api/policies/%2F/{settings.namespace}.{policy}-delivery-limit")
