"""Cancellation benchmark: propagation to a worker's set, memory per key, cost of the check.

    .venv/bin/python bench/cancels.py --cancels 500 --keys 1000000

- Propagation: time from ``cancel()`` returning (the broker confirmed the record) to the
  record reaching a follower's set, as a worker runs it; reported against the 200 ms the
  README promises. It can be negative: the stream may deliver before the confirm arrives.
- Memory: bytes per key of a set holding ``--keys`` cancelled keys (tracemalloc).
- Check: the worker's per-task check on that full set, as a ratio to decoding the task
  from its headers and body, measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import timeit
import tracemalloc
import uuid

from rmqdelay import Scheduler, Settings
from rmqdelay.broker.cancels import CancelFollower
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import decode_task, encode_payload, task_headers

BUDGET_MS = 200.0


async def propagation(url: str, count: int, rate: float) -> list[float]:
    settings = Settings(_env_file=None, url=url, namespace=f"bench-{uuid.uuid4().hex[:6]}")
    await apply_topology(settings, build_topology(settings.layout))
    seen: dict[str, float] = {}
    follower = CancelFollower(settings, on_cancel=lambda key, _: seen.setdefault(key, time.time()))
    stop = asyncio.Event()
    following = asyncio.create_task(follower.run(stop))
    returned: dict[str, float] = {}
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 30)
        async with Scheduler(settings) as scheduler:
            for i in range(count):
                key = f"k{i}"
                await scheduler.cancel(key)
                returned[key] = time.time()
                await asyncio.sleep(1 / rate)  # pacing, not synchronisation
        async with asyncio.timeout(30):
            while len(seen) < count:  # noqa: ASYNC110 - a benchmark's bounded drain
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await following
        await apply_topology(settings, build_topology(settings.layout), delete=True)
    return sorted((seen[k] - returned[k]) * 1000 for k in returned)


def memory_per_key(keys: int) -> float:
    now = time.time_ns() // 1_000_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cancels = CancelSet(retention_ms=10**12)
    for i in range(keys):
        cancels.add(f"incident:{i:08d}", now + i, now)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(cancels) == keys
    return (after - before) / keys


def check_ratio(keys: int) -> tuple[float, float]:
    now = time.time_ns() // 1_000_000
    cancels = CancelSet(retention_ms=10**12)
    for i in range(keys):
        cancels.add(f"incident:{i:08d}", now, now)
    body, content_type = encode_payload({"incident": 42, "note": "x" * 100}, None)
    headers = task_headers(
        uuid.uuid4().hex, due_ms=now, published_ms=now, plan=(6, 3, 1), keys=("incident:42", "t")
    )

    def decode() -> None:
        decode_task(headers=headers, body=body, content_type=content_type, routing_key="d")

    def check_hit() -> None:
        cancels.cancelled_by(("id", "incident:00000042", "t"), now)

    def check_miss() -> None:
        cancels.cancelled_by(("id", "incident:x", "t"), now)

    n = 200_000
    decode_s = min(timeit.repeat(decode, number=n, repeat=5))
    hit_s = min(timeit.repeat(check_hit, number=n, repeat=5))
    miss_s = min(timeit.repeat(check_miss, number=n, repeat=5))
    return hit_s / decode_s, miss_s / decode_s


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_URL", Settings().url))
    parser.add_argument("--cancels", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="cancels per second")
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    lat = await propagation(args.url, args.cancels, args.rate)
    p50, p99, worst = lat[len(lat) // 2], lat[int(len(lat) * 0.99)], lat[-1]
    print(f"propagation, {args.cancels} cancels at {args.rate:.0f}/s, confirmed cancel -> set:")
    print(
        f"  share of the {BUDGET_MS:.0f} ms budget: p50 {p50 / BUDGET_MS:.1%}, "
        f"p99 {p99 / BUDGET_MS:.1%}, max {worst / BUDGET_MS:.1%}"
    )
    print(f"memory: {memory_per_key(args.keys):.0f} bytes per key with {args.keys:,} keys")
    hit, miss = check_ratio(args.keys)
    print(
        f"check on {args.keys:,} keys, as a share of decoding the task: "
        f"cancelled {hit:.2f}x, not cancelled {miss:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
