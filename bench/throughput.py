"""The hot path against raw aio-pika, side by side in one run.

Publishing: ``schedule()`` (one call per task, ``--inflight`` at a time) and
``schedule_many()`` (batches of ``--inflight``) against a raw confirmed aio-pika publish of
the same body to a quorum queue, with the same number in flight.

Draining: a ``Worker`` with a no-op handler against a raw consume+ack loop on the same
number of waiting messages, with the worker's prefetch.

Rounds alternate (raw, rmqdelay, raw, ...) so that both see the same machine; the ratio of
the medians is what to read, not the rates.

    .venv/bin/python bench/throughput.py --count 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika

from rmqdelay import Scheduler, Settings, Task, TaskSpec, Worker
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

DESTINATION = "bench"
PAYLOAD = {"order": 12345, "action": "remind"}
BODY = b'{"order":12345,"action":"remind"}'


async def timed(count: int, inflight: int, one: Callable[[int], Awaitable[object]]) -> float:
    """Rate of ``count`` calls of ``one``, at most ``inflight`` at a time."""
    window = asyncio.Semaphore(inflight)

    async def call(i: int) -> None:
        async with window:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(count)))
    return count / (time.perf_counter() - start)


async def raw_publish(url: str, queue: str, count: int, inflight: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        exchange = channel.default_exchange

        async def one(i: int) -> None:
            message = aio_pika.Message(
                BODY,
                headers={"i": i},
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, queue)

        return await timed(count, inflight, one)


async def raw_drain(url: str, queue: str, count: int, prefetch: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        declared = await channel.declare_queue(queue, passive=True)
        done = asyncio.Event()
        acked = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal acked
            await message.ack()
            acked += 1
            if acked == count:
                done.set()

        start = time.perf_counter()
        await declared.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        return count / (time.perf_counter() - start)


async def schedule_rate(scheduler: Scheduler, count: int, inflight: int) -> float:
    return await timed(count, inflight, lambda i: scheduler.schedule(DESTINATION, PAYLOAD, delay=0))


async def schedule_many_rate(scheduler: Scheduler, count: int, batch: int) -> float:
    specs = [TaskSpec(DESTINATION, PAYLOAD, delay=0) for _ in range(batch)]
    start = time.perf_counter()
    for _ in range(count // batch):
        await scheduler.schedule_many(specs)
    return (count // batch * batch) / (time.perf_counter() - start)


async def worker_drain(settings: Settings, count: int) -> tuple[float, int]:
    async def nothing(task: Task) -> None:
        return None

    worker = Worker(settings, DESTINATION, nothing)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 60)
    start = time.perf_counter()
    await asyncio.wait_for(worker.wait_for(lambda s: s.executed >= count), 300)
    rate = count / (time.perf_counter() - start)
    stop.set()
    await running
    return rate, worker.prefetch


async def purge(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await (await channel.declare_queue(queue, passive=True)).purge()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_TEST_URL", "amqp://localhost/"))
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--inflight", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["publish", "drain"])
    args = parser.parse_args()
    settings = Settings(_env_file=None, url=args.url, namespace=f"tp-{uuid.uuid4().hex[:6]}")
    raw_queue = f"bench-raw-{uuid.uuid4().hex[:6]}"
    topology = build_topology(settings.layout, (DESTINATION,))
    await apply_topology(settings, topology)
    work_queue = settings.names.work_queue(DESTINATION)
    rates: dict[str, list[float]] = {}
    try:
        async with Scheduler(settings) as scheduler:
            for _ in range(args.rounds):
                if args.only != "drain":
                    raw = await raw_publish(args.url, raw_queue, args.count, args.inflight)
                    rates.setdefault("raw publish", []).append(raw)
                    await purge(args.url, raw_queue)
                    rate = await schedule_rate(scheduler, args.count, args.inflight)
                    rates.setdefault("schedule()", []).append(rate)
                    await purge(args.url, work_queue)
                    rate = await schedule_many_rate(scheduler, args.count, args.inflight)
                    rates.setdefault("schedule_many()", []).append(rate)
                    await purge(args.url, work_queue)
                if args.only != "publish":
                    await scheduler.schedule_many(
                        [TaskSpec(DESTINATION, PAYLOAD, delay=0) for _ in range(args.count)]
                    )
                    rate, prefetch = await worker_drain(settings, args.count)
                    rates.setdefault("worker drain", []).append(rate)
                    await raw_publish(args.url, raw_queue, args.count, args.inflight)
                    raw = await raw_drain(args.url, raw_queue, args.count, prefetch)
                    rates.setdefault("raw consume+ack", []).append(raw)
    finally:
        await apply_topology(settings, topology, delete=True)
        connection = await aio_pika.connect(args.url)
        async with connection:
            await (await connection.channel()).queue_delete(raw_queue)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{args.count} messages per round, {args.rounds} rounds, {args.inflight} in flight")
    for name, values in rates.items():
        print(f"  {name:18} median {median[name]:8.0f}/s   rounds: "
              + ", ".join(f"{v:.0f}" for v in values))  # fmt: skip
    if "raw publish" in median:
        for name in ("schedule()", "schedule_many()"):
            print(f"  {name} / raw publish: {median[name] / median['raw publish']:.2f}x")
    if "raw consume+ack" in median:
        print(f"  worker / raw consume+ack: "
              f"{median['worker drain'] / median['raw consume+ack']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
