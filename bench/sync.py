"""SyncScheduler against Scheduler, side by side in one run on one broker.

    .venv/bin/python bench/sync.py --calls 2000

- async: 8 coroutines on one Scheduler, each awaiting ``schedule()`` in turn.
- sync: 8 threads on one SyncScheduler, each calling ``schedule()`` in turn.
- asyncio.run: one thread wrapping every call in ``asyncio.run`` with a Scheduler of its
  own (what a synchronous app did before SyncScheduler), on a few calls only.

Reports per-call latency p50/p99 and calls/s for each, and sync's as a ratio to async's:
absolute numbers on a shared machine mean little, the ratios carry over.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from rmqdelay import Scheduler, Settings, SyncScheduler
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

DEST = "bench-sync"
WORKERS = 8


def _report(name: str, latencies: list[float], elapsed: float) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    rate = len(ordered) / elapsed
    print(f"{name:>12}: p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  {rate:8.0f} calls/s")
    return p50, p99, rate


async def run_async(settings: Settings, calls: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    async with Scheduler(settings) as scheduler:

        async def one(n: int) -> None:
            for _ in range(n):
                began = time.perf_counter()
                await scheduler.schedule(DEST, {"x": 1}, delay=3600)
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(one(calls // WORKERS) for _ in range(WORKERS)))
        return latencies, time.perf_counter() - began


def run_sync(settings: Settings, calls: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    with SyncScheduler(settings) as client:

        def one(n: int) -> None:
            for _ in range(n):
                began = time.perf_counter()
                client.schedule(DEST, {"x": 1}, delay=3600)
                latencies.append(time.perf_counter() - began)  # list.append is atomic

        began = time.perf_counter()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(one, [calls // WORKERS] * WORKERS))
        return latencies, time.perf_counter() - began


def run_asyncio_run(settings: Settings, calls: int) -> tuple[list[float], float]:
    async def once() -> None:
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule(DEST, {"x": 1}, delay=3600)

    latencies = []
    began = time.perf_counter()
    for _ in range(calls):
        one = time.perf_counter()
        asyncio.run(once())
        latencies.append(time.perf_counter() - one)
    return latencies, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@localhost:5672/%2F")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--wrapped-calls", type=int, default=20)
    args = parser.parse_args()
    settings = Settings(_env_file=None, url=args.url, namespace=f"bench-{uuid.uuid4().hex[:6]}")
    topology = build_topology(settings.layout, (DEST,))
    asyncio.run(apply_topology(settings, topology))
    try:
        run_sync(settings, WORKERS * 10)  # warm both paths up before measuring
        asyncio.run(run_async(settings, WORKERS * 10))
        a = _report("async", *asyncio.run(run_async(settings, args.calls)))
        s = _report("sync", *run_sync(settings, args.calls))
        w = _report("asyncio.run", *run_asyncio_run(settings, args.wrapped_calls))
        print(
            f"sync/async: p50 x{s[0] / a[0]:.2f}, p99 x{s[1] / a[1]:.2f}, "
            f"calls/s x{s[2] / a[2]:.2f}; asyncio.run per call / sync p50: x{w[0] / s[0]:.0f}"
        )
    finally:
        asyncio.run(apply_topology(settings, topology, delete=True))


if __name__ == "__main__":
    main()
