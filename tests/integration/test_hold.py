"""Exact release in the worker: the levels deliver up to the hold window early, the
worker holds.

These tests use coarse resolutions (200 ms to 1 s) and, unless they say otherwise, a
window of one unit, so that early arrival is large enough to observe and each task
still takes its hops; the mechanism is the same at any resolution and window.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pika
import pytest

from rmqdelay import Scheduler, Settings, Task
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

from .conftest import make_settings
from .helpers import Recorder, get_all, logged, running_worker, subprocess_env
from .proxy import Proxy
from .test_cli import _line_with

pytestmark = pytest.mark.integration


async def _coarse(broker_url: str, resolution_ms: int) -> AsyncIterator[Settings]:
    settings = make_settings(broker_url, resolution_ms=resolution_ms, max_delay=timedelta(hours=1))
    await apply_topology(settings, build_topology(settings.layout, ("dest",)))
    yield settings
    await apply_topology(settings, build_topology(settings.layout, ("dest",)), delete=True)


@pytest.fixture
async def coarse(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of its own at 200 ms resolution."""
    async for settings in _coarse(broker_url, 200):
        yield settings


@pytest.fixture
async def very_coarse(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of its own at 1 s resolution: a task is held for most of a second."""
    async for settings in _coarse(broker_url, 1000):
        yield settings


async def test_early_tasks_are_held_and_released_in_due_order_never_early(
    coarse: Settings,
) -> None:
    recorder = Recorder()
    # Published in this order, all arrive after one 200 ms level at about the same time,
    # 155-195 ms early (well above hop latency under load); their due times run the other way.
    delays_ms = [395, 385, 375, 365, 355]
    async with (
        running_worker(coarse, "dest", recorder) as worker,
        Scheduler(coarse) as scheduler,
    ):
        scheduled = [await scheduler.schedule("dest", {}, delay=d / 1000) for d in delays_ms]
        await recorder.wait_for({s.id for s in scheduled}, within=10)
    assert worker.stats.held == len(delays_ms), "each arrived early and was held"
    lateness = recorder.lateness_ms()
    assert min(lateness.values()) >= 0, "released at the due time, never before"
    started = [task.id for task, _ in sorted(recorder.runs, key=lambda run: run[1])]
    by_due = [s.id for s in sorted(scheduled, key=lambda s: s.due_at)]
    assert started == by_due


async def test_a_task_cancelled_while_held_does_not_run(very_coarse: Settings) -> None:
    recorder = Recorder()
    async with (
        running_worker(very_coarse, "dest", recorder) as worker,
        Scheduler(very_coarse) as scheduler,
    ):
        await scheduler.schedule("dest", {}, delay=1.9, keys=["held:1"])
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.held == 1)
        await scheduler.cancel("held:1")
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.cancelled == 1)
    assert recorder.runs == []


async def test_stopping_returns_held_tasks_at_once_and_the_next_worker_runs_them(
    very_coarse: Settings,
) -> None:
    recorder = Recorder()
    async with Scheduler(very_coarse) as scheduler:
        s = await scheduler.schedule("dest", {}, delay=1.9)
    patient = very_coarse.model_copy(update={"shutdown_grace": timedelta(seconds=30)})
    async with running_worker(patient, "dest", recorder) as worker:
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.held == 1)
        stopping_at = time.monotonic()
    assert time.monotonic() - stopping_at < 5, "a held task is not in flight: no grace wait"
    assert worker.stats.requeued == 1
    async with running_worker(very_coarse, "dest", recorder):
        await recorder.wait_for({s.id}, within=10)
    assert recorder.lateness_ms()[s.id] >= 0


async def test_a_held_task_whose_worker_dies_runs_on_the_next_worker_on_time(
    very_coarse: Settings,
) -> None:
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", "--log-level", "DEBUG", "consume", "dest",
        "--handler", "tests.integration.handlers:report",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(very_coarse),
    )  # fmt: skip
    assert doomed.stderr is not None
    try:
        await _line_with(doomed.stderr, "consuming", within=30)
        async with Scheduler(very_coarse) as scheduler:
            s = await scheduler.schedule("dest", {}, delay=1.9)
        await _line_with(doomed.stderr, f"holding {s.id}", within=10)
    finally:
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    recorder = Recorder()
    async with running_worker(very_coarse, "dest", recorder):
        await recorder.wait_for({s.id}, within=15)
    task = recorder.runs[0][0]
    assert task.redelivered
    assert recorder.lateness_ms()[s.id] >= 0


def _publish(settings: Settings, headers: dict[str, object], body: bytes) -> None:
    """Publish with a plain AMQP client (pika), confirmed, as another language would."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=f"{settings.namespace}.schedule",
            routing_key="dest",
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=str(headers["rmqdelay-id"]),
                headers=headers,
            ),
            mandatory=True,
        )
    finally:
        connection.close()


def _publish_as_the_readme_says(settings: Settings, delay_ms: int, task_id: str) -> int:
    """The wire format's recipe (docs/reference/wire-format.md), step by step; returns the
    due time (ms)."""
    now_ms = int(time.time() * 1000)
    n = delay_ms // settings.resolution_ms  # whole units: the worker holds the remainder
    levels = [k for k in range(n.bit_length() - 1, -1, -1) if n >> k & 1]
    stops = [str(k) for k in levels] + ["work"]
    headers: dict[str, object] = {
        "rmqdelay-id": task_id,
        "rmqdelay-due": now_ms + delay_ms,
        "rmqdelay-published": now_ms,
        "rmqdelay-route-in": stops[0],
    }
    headers.update({f"rmqdelay-route-{k}": nxt for k, nxt in zip(levels, stops[1:], strict=True)})
    _publish(settings, headers, json.dumps({"from": "pika"}).encode())
    return now_ms + delay_ms


async def test_a_task_published_by_a_plain_amqp_client_per_the_readme_runs_on_time(
    coarse: Settings,
) -> None:
    recorder = Recorder()
    task_id = uuid.uuid4().hex
    async with running_worker(coarse, "dest", recorder) as worker:
        due_ms = await asyncio.to_thread(_publish_as_the_readme_says, coarse, 1390, task_id)
        await recorder.wait_for({task_id}, within=10)
    task, ran = recorder.runs[0]
    assert task.payload == {"from": "pika"}
    assert ran * 1000 >= due_ms, "never early"
    # 1390 ms at 200 ms: 6 units in the levels, so it reaches the worker 190 ms early and
    # is held. Unless the levels took longer than that margin (a loaded broker: 82 ms late
    # once in CI): then it arrived after its due time, and ran at once.
    if worker.stats.held == 0:
        assert worker.stats.lateness_max_s > 0, "not held, so it must have arrived late"
    else:
        assert worker.stats.held == 1


async def test_a_task_far_ahead_of_its_due_time_goes_back_through_the_levels(
    coarse: Settings,
) -> None:
    recorder = Recorder()
    task_id = uuid.uuid4().hex
    with logged("rmqdelay.worker", "sending it back through the levels") as sent_back:
        async with running_worker(coarse, "dest", recorder):
            # A wrong plan: straight to the work queue, for a task due in 8 s: more than
            # two units plus the clock-skew margin (5.4 s) ahead, however long it takes
            # to publish (stamped once the worker runs: its start took over 0.6 s once).
            now_ms = int(time.time() * 1000)
            headers: dict[str, object] = {
                "rmqdelay-id": task_id,
                "rmqdelay-due": now_ms + 8000,
                "rmqdelay-published": now_ms,
                "rmqdelay-route-in": "work",
            }
            await asyncio.to_thread(_publish, coarse, headers, b"{}")
            await recorder.wait_for({task_id}, within=20)
    assert sent_back.is_set()
    assert recorder.runs[0][1] * 1000 >= now_ms + 8000, "never early"


async def test_a_task_due_beyond_the_maximum_delay_is_parked_not_left_unsettled(
    coarse: Settings,
) -> None:
    task_id = uuid.uuid4().hex
    now_ms = int(time.time() * 1000)
    headers: dict[str, object] = {
        "rmqdelay-id": task_id,
        "rmqdelay-due": now_ms + 2 * 3_600_000,  # two hours; this namespace holds one
        "rmqdelay-published": now_ms,
        "rmqdelay-route-in": "work",
    }
    async with running_worker(coarse, "dest", Recorder()) as worker:
        await asyncio.to_thread(_publish, coarse, headers, b"{}")
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.parked == 1)
    [parked] = await get_all(coarse, coarse.names.parked, ack=True)
    assert parked.headers["rmqdelay-id"] == task_id
    assert "cannot send back" in parked.headers["rmqdelay-parked-reason"]
    assert "exceeds the maximum of 1h" in parked.headers["rmqdelay-parked-reason"]


async def test_a_hold_window_sends_tasks_due_within_it_straight_to_a_worker_never_early(
    coarse: Settings,
) -> None:
    """With a 2 s window at 200 ms units, a task due within 2 s takes no hop, and one due
    later takes the fewest hops that bring it within 2 s; the worker (same window) holds
    each until due."""
    windowed = coarse.model_copy(update={"hold_window": timedelta(seconds=2)})
    recorder = Recorder()
    delays_s = [0.3, 1.1, 1.9, 3.0, 3.9]
    async with (
        running_worker(windowed, "dest", recorder) as worker,
        Scheduler(windowed) as scheduler,
    ):
        scheduled = [await scheduler.schedule("dest", {}, delay=d) for d in delays_s]
        await recorder.wait_for({s.id for s in scheduled}, within=20)
    # 3.0 s: 5-15 units qualify, 8 is one hop; 3.9 s: 10-19 units, 16 is one hop.
    assert [s.hops for s in scheduled] == [0, 0, 0, 1, 1]
    assert worker.stats.held == len(delays_s)
    assert min(recorder.lateness_ms().values()) >= 0, "never early"
    async with Scheduler(coarse) as scheduler:  # one unit's window: more hops
        assert (await scheduler.schedule("dest", {}, delay=3.9)).hops == 3


async def test_a_backlog_past_the_unacked_limit_is_handed_back_and_runs_once(
    settings: Settings, destination: str
) -> None:
    """Deliveries waiting for a slot longer than the worker allows (the broker's consumer
    timeout would close the channel) go back as fresh copies, and each task still runs once."""
    gate, blocking = asyncio.Event(), asyncio.Event()
    runs: dict[str, int] = {}

    async def handler(task: Task) -> None:
        runs[task.id] = runs.get(task.id, 0) + 1
        if task.payload.get("block"):
            blocking.set()
            await gate.wait()

    async with (
        running_worker(settings, destination, handler, concurrency=1) as worker,
        Scheduler(settings) as scheduler,
    ):
        worker.max_unacked_s = 0.3
        first = await scheduler.schedule(destination, {"block": True}, delay=0)
        await asyncio.wait_for(blocking.wait(), 20)
        rest = [await scheduler.schedule(destination, {"i": i}, delay=0) for i in range(3)]
        async with asyncio.timeout(20):
            await worker.wait_for(lambda s: s.backlogged >= 3)
        assert not any(s.id in runs for s in rest), "none ran while the slot was taken"
        gate.set()
        async with asyncio.timeout(20):
            await worker.wait_for(lambda s: s.executed >= 4)
    assert runs == {t.id: 1 for t in [first, *rest]}


async def test_the_default_window_sends_tasks_due_within_16_s_straight_to_a_worker(
    settings: Settings, destination: str
) -> None:
    """The shipped default: no hop for a task due within 16 s, held by the worker until due."""
    default = settings.model_copy(update={"hold_window": None})
    assert default.hold_window_s == 16.0
    recorder = Recorder()
    async with (
        running_worker(default, destination, recorder) as worker,
        Scheduler(default) as scheduler,
    ):
        scheduled = [await scheduler.schedule(destination, {}, delay=d) for d in (0.4, 1.5)]
        await recorder.wait_for({s.id for s in scheduled}, within=20)
    assert [s.hops for s in scheduled] == [0, 0]
    assert worker.stats.held == 2
    assert min(recorder.lateness_ms().values()) >= 0, "never early"


async def test_tasks_held_when_the_connection_drops_run_once_after_redelivery(
    settings: Settings, destination: str
) -> None:
    """A held delivery whose channel closed is not run from the worker's memory: the
    broker delivers it again, it is held again, and it runs once, never early."""
    window = timedelta(seconds=3)
    recorder = Recorder()
    async with (
        Proxy(settings.url) as proxy,
        Scheduler(settings.model_copy(update={"hold_window": window})) as scheduler,
    ):
        via_proxy = make_settings(
            proxy.url, namespace=settings.namespace, declare=False, hold_window=window
        )
        await scheduler.declare_destination(destination)
        async with running_worker(via_proxy, destination, recorder) as worker:
            scheduled = [await scheduler.schedule(destination, {"i": i}, delay=2) for i in range(5)]
            assert {s.hops for s in scheduled} == {0}
            async with asyncio.timeout(10):
                await worker.wait_for(lambda s: s.held >= 5)
            proxy.cut()
            await recorder.wait_for({s.id for s in scheduled}, within=30)
            async with asyncio.timeout(10):  # every entry, stale or not, has come due
                while len(worker._holder):  # noqa: ASYNC110 - the heap has no event
                    await asyncio.sleep(0.05)
        assert worker.stats.held >= 10, "held, then held again after the redelivery"
    assert [recorder.counts[s.id] for s in scheduled] == [1] * 5
    assert min(recorder.lateness_ms().values()) >= 0, "never early"
