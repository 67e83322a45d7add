"""The hot path against raw aio-pika, side by side in one run.

Publishing: ``schedule()`` (one call per task, ``--inflight`` at a time) and
``schedule_many()`` (batches of ``--inflight``) against a raw confirmed aio-pika publish of
the same body to a quorum queue, with the same number in flight.

Draining: a ``Worker`` with a no-op handler against a raw consume+ack loop, each on the
same number of the same task messages waiting in the same work queue, with the worker's
prefetch.

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


#: (messages per second, this process's CPU microseconds per message)
Measured = tuple[float, float]


class Clock:
    """Wall time and this process's CPU time from its creation. The CPU time per message
    is the steadier figure on a shared machine: the broker runs in another process."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per(self, count: int) -> Measured:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return count / wall, cpu / count * 1e6


async def timed(count: int, inflight: int, one: Callable[[int], Awaitable[object]]) -> Measured:
    """Rate of ``count`` calls of ``one``, at most ``inflight`` at a time."""
    window = asyncio.Semaphore(inflight)

    async def call(i: int) -> None:
        async with window:
            await one(i)

    clock = Clock()
    await asyncio.gather(*(call(i) for i in range(count)))
    return clock.per(count)


async def raw_publish(url: str, queue: str, count: int, inflight: int) -> Measured:
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


async def raw_drain(url: str, queue: str, count: int, prefetch: int) -> Measured:
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

        clock = Clock()
        await declared.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        return clock.per(count)


async def schedule_rate(scheduler: Scheduler, count: int, inflight: int) -> Measured:
    return await timed(count, inflight, lambda i: scheduler.schedule(DESTINATION, PAYLOAD, delay=0))


async def schedule_many_rate(scheduler: Scheduler, count: int, batch: int) -> Measured:
    specs = [TaskSpec(DESTINATION, PAYLOAD, delay=0) for _ in range(batch)]
    clock = Clock()
    for _ in range(count // batch):
        await scheduler.schedule_many(specs)
    return clock.per(count // batch * batch)


async def worker_drain(settings: Settings, count: int) -> Measured:
    done = asyncio.Event()
    ran = 0

    async def count_it(task: Task) -> None:
        # Counted by the handler, as the raw loop counts: a waiter woken on every task
        # (worker.wait_for) would cost the worker a loop turn per task.
        nonlocal ran
        ran += 1
        if ran == count:
            done.set()

    worker = Worker(settings, DESTINATION, count_it)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 60)
    clock = Clock()
    await asyncio.wait_for(done.wait(), 300)
    measured = clock.per(count)
    stop.set()
    await running
    return measured


async def publish_round(
    args: argparse.Namespace, scheduler: Scheduler, raw_queue: str, rates: dict[str, list[Measured]]
) -> None:
    raw = await raw_publish(args.url, raw_queue, args.count, args.inflight)
    rates.setdefault("raw publish", []).append(raw)
    await purge(args.url, raw_queue)
    work_queue = scheduler.wiring.names.work_queue(DESTINATION)
    rate = await schedule_rate(scheduler, args.count, args.inflight)
    rates.setdefault("schedule()", []).append(rate)
    await purge(args.url, work_queue)
    rate = await schedule_many_rate(scheduler, args.count, args.inflight)
    rates.setdefault("schedule_many()", []).append(rate)
    await purge(args.url, work_queue)


async def drain_round(
    settings: Settings,
    scheduler: Scheduler,
    count: int,
    rates: dict[str, list[Measured]],
    *,
    raw_first: int,
) -> None:
    """The same task messages in the same queue for both consumers; which goes first
    alternates between rounds."""
    tasks = [TaskSpec(DESTINATION, PAYLOAD, delay=0) for _ in range(count)]
    prefetch = settings.prefetch_for(settings.concurrency)
    for which in ("raw", "worker") if raw_first else ("worker", "raw"):
        await scheduler.schedule_many(tasks)
        if which == "worker":
            rates.setdefault("worker drain", []).append(await worker_drain(settings, count))
        else:
            queue = settings.names.work_queue(DESTINATION)
            rates.setdefault("raw consume+ack", []).append(
                await raw_drain(settings.url, queue, count, prefetch)
            )


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
    rates: dict[str, list[Measured]] = {}
    try:
        async with Scheduler(settings) as scheduler:
            for i in range(args.rounds):
                if args.only != "drain":
                    await publish_round(args, scheduler, raw_queue, rates)
                if args.only != "publish":
                    await drain_round(settings, scheduler, args.count, rates, raw_first=i % 2)
    finally:
        await apply_topology(settings, topology, delete=True)
        connection = await aio_pika.connect(args.url)
        async with connection:
            await (await connection.channel()).queue_delete(raw_queue)
    print(f"{args.count} messages per round, {args.rounds} rounds, {args.inflight} in flight")
    for name, values in rates.items():
        print(
            f"  {name:18} median {statistics.median(v[0] for v in values):6.0f}/s, "
            f"{statistics.median(v[1] for v in values):5.0f} us CPU/msg; rounds: "
            + ", ".join(f"{rate:.0f}" for rate, _ in values)
        )
    for name, baseline in (
        ("schedule()", "raw publish"),
        ("schedule_many()", "raw publish"),
        ("worker drain", "raw consume+ack"),
    ):
        if name in rates:
            print(f"  {name} / {baseline}: {_ratio(rates[name], rates[baseline])}")


def _ratio(ours: list[Measured], raw: list[Measured]) -> str:
    """Rate ratio (the median of the rounds' own ratios: each round's pair ran back to
    back) and the raw path's CPU per message over ours (above 1: we cost less)."""
    rate = statistics.median(o[0] / r[0] for o, r in zip(ours, raw, strict=True))
    cpu = statistics.median(r[1] / o[1] for o, r in zip(ours, raw, strict=True))
    return f"rate {rate:.2f}x, CPU per message {cpu:.2f}x"


if __name__ == "__main__":
    asyncio.run(main())
