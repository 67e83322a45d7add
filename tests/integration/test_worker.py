"""The worker against a real broker: acks, stopping, concurrency, parking."""

from __future__ import annotations

import asyncio
import threading
import time

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage

from rmqdelay import RetryPolicy, Scheduler, Settings, Task, TopologyMismatchError, Worker
from rmqdelay.core.wire import PARKED_FROM, PARKED_REASON, TASK_ID
from rmqdelay.worker.delivery import Delivery

from .conftest import make_settings
from .helpers import Recorder, depth, get_all, running_worker

pytestmark = pytest.mark.integration


async def test_consumer_stopped_mid_run_loses_nothing(settings: Settings, destination: str) -> None:
    first, second = Recorder(), Recorder()
    started_enough = asyncio.Event()

    async def slow(task: Task) -> None:
        await asyncio.sleep(0.02)  # simulated work, not synchronisation
        await first(task)
        if len(first.ids) >= 20:
            started_enough.set()

    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        ids = {
            s.id
            for s in await asyncio.gather(
                *(scheduler.schedule(destination, {"i": i}, delay=0) for i in range(200))
            )
        }
    async with running_worker(settings, destination, slow, concurrency=4, prefetch=50) as worker:
        await asyncio.wait_for(started_enough.wait(), timeout=20)
    stats = worker.stats
    assert 20 <= stats.executed < 200, "the worker should have stopped mid-run"
    assert stats.requeued > 0, "prefetched deliveries should have gone back to the queue"
    async with running_worker(settings, destination, second):
        await second.wait_for(ids - first.ids, within=20)
    assert first.ids | second.ids == ids
    assert await depth(settings, settings.names.work_queue(destination)) == 0


async def test_task_running_past_the_grace_period_goes_back_to_the_queue(
    broker_url: str, settings: Settings, destination: str
) -> None:
    impatient = make_settings(
        broker_url, namespace=settings.namespace, declare=False, shutdown_grace="200ms"
    )
    entered, recorder = asyncio.Event(), Recorder()

    async def stuck(task: Task) -> None:
        entered.set()
        await asyncio.Event().wait()  # never finishes on its own

    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {}, delay=0)
    async with running_worker(impatient, destination, stuck) as worker:
        await asyncio.wait_for(entered.wait(), timeout=10)
    assert worker.stats.executed == 0
    assert worker.stats.requeued == 1
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({s.id}, within=10)
    assert recorder.runs[0][0].redelivered


async def test_concurrency_is_bounded_and_used(settings: Settings, destination: str) -> None:
    active, peak, done = 0, 0, Recorder()

    async def handler(task: Task) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)  # simulated work
        active -= 1
        await done(task)

    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        scheduled = [await scheduler.schedule(destination, {}, delay=0) for _ in range(30)]
    async with running_worker(settings, destination, handler, concurrency=3, prefetch=10):
        await done.wait_for({s.id for s in scheduled}, within=20)
    assert peak == 3


async def test_plain_handlers_run_off_the_event_loop(settings: Settings, destination: str) -> None:
    threads: list[str] = []
    ran = threading.Event()

    def blocking(task: Task) -> None:
        time.sleep(0.01)  # a blocking call, as plain handlers make
        threads.append(threading.current_thread().name)
        ran.set()

    async with running_worker(settings, destination, blocking), Scheduler(settings) as scheduler:
        await scheduler.schedule(destination, {}, delay=0)
        await asyncio.wait_for(asyncio.to_thread(ran.wait, 10), timeout=15)
    assert threads[0].startswith("rmqdelay")


async def test_failing_handler_on_its_only_attempt_parks_the_task_with_the_reason(
    settings: Settings, destination: str
) -> None:
    failed = asyncio.Event()

    async def broken(task: Task) -> None:
        failed.set()
        raise ValueError(f"cannot handle {task.payload['n']}")

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with (
        running_worker(settings, destination, broken, retry=once) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule(destination, {"n": 42}, delay=0.01)
        await asyncio.wait_for(failed.wait(), timeout=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.parked == 1)
    parked = await get_all(settings, settings.names.parked, ack=True)
    assert [m.headers[TASK_ID] for m in parked] == [s.id]
    assert parked[0].headers[PARKED_REASON] == "ValueError: cannot handle 42 (attempt 1 of 1)"
    assert parked[0].headers[PARKED_FROM] == settings.names.work_queue(destination)
    assert not any(k.startswith("x-death") for k in parked[0].headers)
    assert await depth(settings, settings.names.work_queue(destination)) == 0


async def test_worker_without_declaring_names_the_missing_work_queue(
    broker_url: str, settings: Settings, destination: str
) -> None:
    undeclared = make_settings(broker_url, namespace=settings.namespace, declare=False)
    worker = Worker(undeclared, destination, Recorder())
    with pytest.raises(TopologyMismatchError, match=f"'{destination}' does not exist"):
        await worker.run(asyncio.Event())


async def test_a_delivery_is_settled_once_and_a_second_ack_leaves_the_channel_open(
    settings: Settings, destination: str
) -> None:
    # A second ack of one delivery tag makes the broker close the channel (and every
    # other delivery on it with it): the worker's Delivery must never send one.
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        first = await scheduler.schedule(destination, {"n": 1}, delay=0)
        await scheduler.schedule(destination, {"n": 2}, delay=0)
        connection = await aio_pika.connect(settings.url)
        async with connection:
            channel = await (await connection.channel()).get_underlay_channel()
            got: asyncio.Queue[Delivery] = asyncio.Queue()

            async def collect(message: DeliveredMessage) -> None:
                await got.put(Delivery(message))

            await channel.basic_qos(prefetch_count=10)
            await channel.basic_consume(settings.names.work_queue(destination), collect)
            async with asyncio.timeout(10):
                one, two = await got.get(), await got.get()
            assert one.headers is not None
            assert one.headers[TASK_ID] == first.id
            await one.ack()
            await one.ack()  # no second frame
            await one.reject(requeue=True)  # nor a reject after the ack
            await two.ack()
            await channel.basic_qos(prefetch_count=10)  # a round trip: an error would show
            assert not channel.is_closed
    assert await depth(settings, settings.names.work_queue(destination)) == 0
