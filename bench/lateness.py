"""Lateness benchmark: rmqdelay's levels against one queue with per-message TTLs.

Publishes ``--count`` tasks at a fixed ``--rate`` with random delays, executes them with a
real Worker, and reports publish rate and lateness (execution start minus due time):
p50/p99/max, early, missing and duplicate counts. In the same run it pushes the same load
through a naive single queue with per-message TTLs and prints the ratio: timings on a
shared machine are noisy, ratios measured side by side are what to compare.

    .venv/bin/python bench/lateness.py --rate 500 --count 2000 --resolution-ms 10,5,1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika

from rmqdelay import Scheduler, Settings, Task, Worker
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology


@dataclass
class Result:
    name: str
    publish_rate: float
    lateness_ms: list[float]
    missing: int
    duplicates: int
    hops: float = 0.0

    @classmethod
    def of(
        cls,
        name: str,
        publish_rate: float,
        lateness: Mapping[Any, float],
        seen: Counter[Any],
        total: int,
        hops: int,
    ) -> Result:
        """Summarise one pipeline's run: first-execution lateness, and what went wrong."""
        return cls(
            name,
            publish_rate,
            list(lateness.values()),
            missing=total - len(seen),
            duplicates=sum(n - 1 for n in seen.values()),
            hops=hops / total,
        )

    def pct(self, q: float) -> float:
        ordered = sorted(self.lateness_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def early(self) -> int:
        return sum(1 for x in self.lateness_ms if x < 0)

    def row(self) -> str:
        return (
            f"{self.name:<24} {self.publish_rate:>8.0f}/s {self.hops:>5.1f} "
            f"{self.pct(0.5):>8.1f} {self.pct(0.99):>8.1f} {max(self.lateness_ms, default=0):>9.1f}"
            f" {self.early:>6} {self.missing:>8} {self.duplicates:>5}"
        )


HEADER = (
    f"{'pipeline':<24} {'publish':>10} {'hops':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>9}"
    f" {'early':>6} {'missing':>8} {'dupes':>5}"
)


async def paced(count: int, rate: float, publish: Callable[[int], Awaitable[object]]) -> float:
    """Start ``publish(i)`` at a fixed rate (confirms pipelined); return the achieved rate."""
    loop = asyncio.get_running_loop()
    start, pending = loop.time(), []
    for i in range(count):
        ahead = start + i / rate - loop.time()
        if ahead > 0:
            await asyncio.sleep(ahead)  # pacing the load, not synchronisation
        pending.append(asyncio.create_task(publish(i)))
    await asyncio.gather(*pending)
    return count / (loop.time() - start)


async def load(
    delays: list[float],
    rate: float,
    publish: Callable[[int], Awaitable[object]],
    all_in: asyncio.Event,
) -> float:
    """Publish every task at ``rate``, then wait (bounded) until all have executed.

    Returns the publish rate; tasks still missing at the deadline are counted, not waited on.
    """
    publish_rate = await paced(len(delays), rate, publish)
    try:
        await asyncio.wait_for(all_in.wait(), max(delays) + 60)
    except TimeoutError:
        pass
    return publish_rate


async def run_rmqdelay(url: str, delays: list[float], rate: float, res: int, qtype: str) -> Result:
    settings = Settings(
        _env_file=None,
        url=url,
        namespace=f"bench-{uuid.uuid4().hex[:6]}",
        resolution_ms=res,
        queue_type=qtype,
        concurrency=64,  # prefetch: the default, with room for held early tasks
    )
    seen: Counter[str] = Counter()
    lateness: dict[str, float] = {}
    all_in = asyncio.Event()

    async def handler(task: Task) -> None:
        lateness.setdefault(task.id, (time.time() - task.due_at.timestamp()) * 1000)
        seen[task.id] += 1
        if len(seen) == len(delays):
            all_in.set()

    stop = asyncio.Event()
    worker = Worker(settings, "bench", handler)
    running = asyncio.create_task(worker.run(stop))
    hops = 0
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        async with Scheduler(settings) as scheduler:

            async def publish(i: int) -> None:
                nonlocal hops
                scheduled = await scheduler.schedule("bench", {"i": i}, delay=delays[i])
                hops += scheduled.hops  # after the await: `hops += await ...` loses updates

            publish_rate = await load(delays, rate, publish, all_in)
    finally:
        stop.set()
        await running
        await apply_topology(settings, build_topology(settings.layout, ("bench",)), delete=True)
    return Result.of(f"rmqdelay {qtype} {res}ms", publish_rate, lateness, seen, len(delays), hops)


async def run_naive(url: str, delays: list[float], rate: float) -> Result:
    """One classic queue, per-message TTL, dead-lettering into a sink that is consumed."""
    tag = uuid.uuid4().hex[:6]
    hold, sink = f"bench-naive-{tag}.hold", f"bench-naive-{tag}.sink"
    seen: Counter[int] = Counter()
    lateness: dict[int, float] = {}
    all_in = asyncio.Event()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=256)
        sink_q = await channel.declare_queue(sink, durable=True)
        await channel.declare_queue(
            hold,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": sink},
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            assert message.headers is not None
            i, due = int(str(message.headers["i"])), int(str(message.headers["due"]))
            lateness.setdefault(i, time.time() * 1000 - due)
            seen[i] += 1
            await message.ack()
            if len(seen) == len(delays):
                all_in.set()

        consumer_tag = await sink_q.consume(on_message)

        async def publish(i: int) -> None:
            due = time.time() * 1000 + delays[i] * 1000
            message = aio_pika.Message(
                b"{}",
                headers={"i": i, "due": int(due) + 1},
                expiration=delays[i],  # seconds, in aio-pika
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, hold)

        try:
            publish_rate = await load(delays, rate, publish, all_in)
        finally:
            await sink_q.cancel(consumer_tag)
            await channel.queue_delete(hold)
            await channel.queue_delete(sink)
    return Result.of("naive single queue", publish_rate, lateness, seen, len(delays), 0)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_URL", Settings().url))
    parser.add_argument("--rate", type=float, default=500.0, help="publishes per second")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--min-delay", type=float, default=0.05, help="seconds")
    parser.add_argument("--max-delay", type=float, default=5.0, help="seconds")
    parser.add_argument("--resolution-ms", default="10", help="comma list, e.g. 10,5,1")
    parser.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    parser.add_argument("--no-naive", action="store_true", help="skip the naive comparison")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    delays = [rng.uniform(args.min_delay, args.max_delay) for _ in range(args.count)]
    print(
        f"{args.count} tasks at {args.rate:.0f}/s, delays {args.min_delay}-{args.max_delay} s "
        f"in random order, {os.cpu_count()} cores, broker {Settings(url=args.url).safe_url}"
    )
    results = []
    for res in (int(x) for x in args.resolution_ms.split(",")):
        results.append(await run_rmqdelay(args.url, delays, args.rate, res, args.queue_type))
    if not args.no_naive:
        results.append(await run_naive(args.url, delays, args.rate))
    print(HEADER)
    for result in results:
        print(result.row())
    if not args.no_naive:
        naive = results[-1]
        for result in results[:-1]:
            print(
                f"naive / {result.name}: p50 x{naive.pct(0.5) / result.pct(0.5):.1f}, "
                f"p99 x{naive.pct(0.99) / result.pct(0.99):.1f}, "
                f"publish rate x{naive.publish_rate / result.publish_rate:.2f}"
            )
    failed = [
        r
        for r in results[: len(results) - (0 if args.no_naive else 1)]
        if r.early or r.missing or r.duplicates
    ]
    for r in failed:
        print(f"FAIL {r.name}: {r.early} early, {r.missing} missing, {r.duplicates} duplicates")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
