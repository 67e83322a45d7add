"""Can one worker hold early tasks at a rate? The worker alone, without the levels' cost.

Tasks are published straight to the work queue, as the levels deliver them: each one up
to one resolution unit before it is due (uniformly). A ``rmqdelay consume`` worker with
default settings, in its own process, holds each until its due time. Reported per rate:
lateness p50/p99/max, early, lost, duplicates, the publish rate reached, and the worker's
CPU time per task (its start-up included), which says how many tasks/s one core
sustains. In the same run, the same rate of tasks already due (nothing to hold) is the
baseline.

    .venv/bin/python bench/hold.py --rate 1000,2000,3000 --count 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from pathlib import Path

import aio_pika
from compare import DESTINATION, Reporter, _consumed, process_cpu_s
from lateness import HEADER, Result, paced

from rmqdelay import Settings
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import route_headers, task_headers

HERE = Path(__file__).resolve().parent


async def run(url: str, rate: float, count: int, early: bool) -> tuple[Result, float | None]:
    settings = Settings(_env_file=None, url=url, namespace=f"hold-{uuid.uuid4().hex[:6]}")
    topology = build_topology(settings.layout, (DESTINATION,))
    await apply_topology(settings, topology)
    env = {"RMQDELAY_URL": url, "RMQDELAY_NAMESPACE": settings.namespace}
    reporter = await Reporter.worker(env, count)
    unit_ms = settings.resolution_ms
    try:
        await _consumed(url, settings.names.work_queue(DESTINATION))
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(settings.names.work_exchange, ensure=False)

            async def publish(i: int) -> None:
                now_ms = time.time_ns() // 1_000_000
                ahead = random.uniform(0, unit_ms) if early else 0.0
                headers = task_headers(
                    f"t{i}", due_ms=now_ms + int(ahead), published_ms=now_ms,
                    route=route_headers(()),
                )  # fmt: skip
                message = aio_pika.Message(
                    b"{}", headers=headers, content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=f"t{i}",
                )  # fmt: skip
                await exchange.publish(message, DESTINATION)

            publish_rate = await paced(count, rate, publish)
            try:
                await asyncio.wait_for(reporter.all_in.wait(), 60)
            except TimeoutError:
                pass
        # The worker's CPU time per task, before it stops: what one worker can sustain.
        used = process_cpu_s(Path(f"/proc/{reporter.process.pid}/stat"))
    finally:
        await reporter.stop()
        await apply_topology(settings, topology, delete=True)
    name = f"held up to {unit_ms} ms" if early else "due on arrival"
    return reporter.result(name, publish_rate, 0), (None if used is None else used / count)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_URL", Settings().url))
    parser.add_argument("--rate", default="2000", help="tasks per second (several: a sweep)")
    parser.add_argument("--count", type=int, default=10000)
    args = parser.parse_args()
    print(f"{args.count} tasks per row, worker in its own process, {os.cpu_count()} cores")
    print(f"{'offered':>8} {HEADER} {'worker CPU/task':>16}")
    failed = False
    for rate in (float(r) for r in args.rate.split(",")):
        for early in (True, False):
            result, cpu = await run(args.url, rate, args.count, early)
            shown = "n/a" if cpu is None else f"{cpu * 1000:.3f} ms"
            print(f"{rate:>6.0f}/s {result.row()} {shown:>16}", flush=True)
            failed |= bool(result.early or result.missing or result.duplicates)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
