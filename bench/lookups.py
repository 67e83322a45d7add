"""Lookups with many tasks pending: schedule ``--pending`` tasks (spread over the next
days, one key each), then time, for a Scheduler that reads the journal per call and for
one that follows it (``follow_journal()``, as ``rmqdelay serve`` does): catching up, the
first page of a listing, a page further on, a lookup by id and by key.

    .venv/bin/python bench/lookups.py --url amqp://guest:guest@localhost:5730/%2F \\
        --pending 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from rmqdelay import Scheduler, Settings, TaskSpec
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

DESTINATION = "bench"
BATCH = 1000


async def timed(what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    started = time.perf_counter()
    result = await call()
    print(f"  {what:34} {time.perf_counter() - started:7.3f} s")
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_TEST_URL", "amqp://localhost/"))
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--read", action="store_true", help="also time reading per call")
    parser.add_argument("--namespace", help="reuse this namespace's tasks (kept afterwards)")
    args = parser.parse_args()
    namespace = args.namespace or f"lk-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        _env_file=None, url=args.url, namespace=namespace, max_delay=timedelta(days=30)
    )
    topology = build_topology(settings.layout, (DESTINATION,))
    await apply_topology(settings, topology)
    try:
        async with Scheduler(settings) as scheduler:
            if not args.namespace:
                started = time.perf_counter()
                for start in range(0, args.pending, BATCH):
                    await scheduler.schedule_many(
                        [
                            TaskSpec(
                                DESTINATION,
                                {"n": i},
                                delay=3600 + i % 86400,
                                keys=[f"order:{i}"],
                            )
                            for i in range(start, start + BATCH)
                        ]
                    )
                took = time.perf_counter() - started
                print(f"scheduled {args.pending} in {took:.0f} s")
            some = (await scheduler.find(key="order:12345")).tasks
            task_id = some[0].id if some else "none"
            if args.read:
                print("reading the journal per call:")
                await timed("find() first page", lambda: scheduler.find(limit=100))
            print("following the journal (follow_journal):")
            await timed("read up to now", lambda: scheduler.follow_journal(wait=True))
            page = await timed("find() first page (100)", lambda: scheduler.find(limit=100))
            await timed("find() next page", lambda: scheduler.find(limit=100, cursor=page.cursor))
            await timed("get(id)", lambda: scheduler.get(task_id))
            await timed("find(key=...)", lambda: scheduler.find(key="order:777"))
            await timed("find(destination=...)", lambda: scheduler.find(destination=DESTINATION))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  client peak RSS {rss:.0f} MB")
    finally:
        if not args.namespace:
            await apply_topology(settings, topology, delete=True)


if __name__ == "__main__":
    asyncio.run(main())
