"""One million pending tasks: publish rate as they pile up, broker memory and disk per
pending task, and whether short tasks stay on time meanwhile.

    .venv/bin/python bench/pending.py --count 1000000

Schedules ``--count`` tasks due in 2-6 hours (they wait in the top levels) in batches,
timing each batch; reports the publish rate over the first and the last 10 % (the goal:
the last at least 0.9x the first). Broker memory per pending task from the management API
(the node's total, and the namespace's queue processes), disk per pending task from the
node's data directory (``--data-dir``, when readable here). Then, with the million
waiting, schedules short tasks (1-5 s) at a steady rate to a worker and reports their
lateness (none may run early). The namespace is deleted afterwards (with its million).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from compare import broker_memory

from rmqdelay import Scheduler, Settings, Task, TaskSpec, Worker
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

BATCH = 1000
WAITING, SHORT = "waiting", "short"


def disk_bytes(data_dir: Path) -> int | None:
    """Bytes under the broker's data directory (du), or None when not readable here."""
    if not data_dir.is_dir() or shutil.which("du") is None:
        return None
    done = subprocess.run(["du", "-sb", str(data_dir)], capture_output=True, text=True)
    return int(done.stdout.split()[0]) if done.returncode == 0 else None


async def pile_up(scheduler: Scheduler, count: int) -> list[float]:
    """Schedule ``count`` long tasks; the rate (tasks/s) of each batch, in order."""
    rng, rates = random.Random(5), []
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        specs = [
            TaskSpec(WAITING, {"n": start + i}, delay=rng.uniform(7200, 21600)) for i in range(n)
        ]
        began = time.perf_counter()
        await scheduler.schedule_many(specs)
        rates.append(n / (time.perf_counter() - began))
        if start and start % 100_000 == 0:
            print(f"  {start:,} pending", flush=True)
    return rates


async def short_lateness(
    settings: Settings, scheduler: Scheduler, count: int, rate: float
) -> list[float]:
    """Lateness (ms) of ``count`` tasks due in 1-5 s, scheduled at ``rate``/s."""
    ran: dict[str, float] = {}
    due: dict[str, float] = {}
    done = asyncio.Event()

    async def handler(task: Task) -> None:
        ran.setdefault(task.id, time.time())
        if len(ran) >= count:
            done.set()

    worker, stop = Worker(settings, SHORT, handler), asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 60)
    rng = random.Random(7)
    for _ in range(count):
        s = await scheduler.schedule(SHORT, {}, delay=rng.uniform(1, 5))
        due[s.id] = s.due_at.timestamp()
        await asyncio.sleep(1 / rate)  # pacing the load
    await asyncio.wait_for(done.wait(), 60)
    stop.set()
    await running
    return sorted((ran[i] - due[i]) * 1000 for i in due)


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_URL", Settings().url))
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--short", type=int, default=500, help="short tasks for lateness")
    parser.add_argument("--data-dir", type=Path, default=Path("/var/lib/rabbitmq/mnesia"))
    args = parser.parse_args()
    settings = Settings(_env_file=None, url=args.url, namespace=f"pending-{uuid.uuid4().hex[:6]}")
    topology = build_topology(settings.layout, (WAITING, SHORT))
    await apply_topology(settings, topology)
    try:
        memory_before, disk_before = await broker_memory(settings), disk_bytes(args.data_dir)
        async with Scheduler(settings) as scheduler:
            began = time.monotonic()
            rates = await pile_up(scheduler, args.count)
            took = time.monotonic() - began
            tenth = max(1, len(rates) // 10)
            first, last = statistics.median(rates[:tenth]), statistics.median(rates[-tenth:])
            print(
                f"{args.count:,} tasks scheduled in {took:.0f}s in batches of {BATCH}: "
                f"first 10% {first:,.0f}/s, last 10% {last:,.0f}/s, last/first {last / first:.2f}"
            )
            await asyncio.sleep(15)  # the management API samples every 5 s
            memory_after, disk_after = await broker_memory(settings), disk_bytes(args.data_dir)
            if memory_before and memory_after:
                node = (memory_after[0] - memory_before[0]) / args.count
                queues = (memory_after[1] - memory_before[1]) / args.count
                print(
                    f"broker memory per pending task: node {node:,.0f} B, "
                    f"queue processes {queues:,.0f} B"
                )
            if disk_before is not None and disk_after is not None:
                per_task = (disk_after - disk_before) / args.count
                print(f"disk per pending task: {per_task:,.0f} B ({args.data_dir})")
            late = await short_lateness(settings, scheduler, args.short, rate=50)
            print(
                f"{len(late)} short tasks (1-5 s) with {args.count:,} pending: lateness p50 "
                f"{pct(late, 50):.1f} ms, p99 {pct(late, 99):.1f} ms, max {late[-1]:.1f} ms, "
                f"early {sum(1 for x in late if x < 0)}"
            )
    finally:
        began = time.monotonic()
        await apply_topology(settings, topology, delete=True)
        print(f"namespace deleted in {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    asyncio.run(main())
