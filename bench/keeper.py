"""What keeping the journal costs: schedule ``--pending`` tasks due in 6 to 30 days, then,
side by side on one broker, time a whole read of the journal (what a lookup without a
followed index does) and a keeper's pass half a retention later (it reads the same
records and carries every one forward). A new keeper first looks for the last one's
progress in the journal's last half hour (here: all of it); that is timed apart.

    .venv/bin/python bench/keeper.py --url amqp://guest:guest@localhost:5730/%2F \\
        --pending 50000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from datetime import timedelta

from rmqdelay import Scheduler, Settings, TaskSpec
from rmqdelay.broker.cancels import load_cancels
from rmqdelay.broker.connection import connect_once
from rmqdelay.broker.declare import apply_topology
from rmqdelay.broker.journal import read_journal
from rmqdelay.broker.keeper import JournalKeeper
from rmqdelay.core.topology import build_topology

DESTINATION = "bench"
BATCH = 1000
DAY_S = 86_400


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_TEST_URL", "amqp://localhost/"))
    parser.add_argument("--pending", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    read_s: list[float] = []
    keep_s: list[float] = []
    resume_s: list[float] = []
    carried = 0
    for _ in range(args.rounds):
        # A namespace per round: a pass carries each task once, so the next round needs
        # records that were never carried.
        settings = Settings(
            _env_file=None,
            url=args.url,
            namespace=f"kp-{uuid.uuid4().hex[:6]}",
            max_delay=timedelta(days=30),
        )
        topology = build_topology(settings.layout, (DESTINATION,))
        await apply_topology(settings, topology)
        try:
            async with Scheduler(settings) as scheduler:
                for start in range(0, args.pending, BATCH):
                    await scheduler.schedule_many(
                        [
                            TaskSpec(DESTINATION, {"n": i}, delay=6 * DAY_S + i % (24 * DAY_S))
                            for i in range(start, min(args.pending, start + BATCH))
                        ]
                    )
            cancels = await load_cancels(settings)
            async with await connect_once(settings, raw=True) as connection:
                started = time.perf_counter()
                index = await read_journal(settings, connection, timeout_s=600)
                read_s.append(time.perf_counter() - started)
                assert len(index) == args.pending
                keeper = JournalKeeper(settings, cancels)
                later_ms = int((time.time() + 3.5 * DAY_S + 60) * 1000)
                started = time.perf_counter()
                await keeper.resume(connection)  # once per turn: timed apart
                resume_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                done = await keeper.keep_once(connection, later_ms)
                keep_s.append(time.perf_counter() - started)
                carried += done.carried
                assert done.carried == args.pending, done
        finally:
            await apply_topology(settings, topology, delete=True)
    read, keep = statistics.median(read_s), statistics.median(keep_s)
    print(f"{args.pending} pending, {args.rounds} rounds, {carried} carried in all")
    print(f"  whole read of the journal: {args.pending / read:9.0f} records/s (median)")
    print(f"  keeper pass (read + carry): {args.pending / keep:9.0f} records/s (median)")
    print(f"  keeper pass / whole read, time: {keep / read:.2f}x")
    resume = statistics.median(resume_s)
    print(f"  a new keeper's progress lookup / whole read, time: {resume / read:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
