"""What the journal costs, side by side in one run: schedule() and schedule_many() with
RMQDELAY_JOURNAL on and off, then what pending tasks cost the broker in memory and disk,
and how long lookups take with many pending.

Two namespaces on one broker, alike but for the journal. Rounds alternate (on, off, on,
...) so both see the same machine; read the ratios, not the rates. With --broker-pid the
broker's CPU per task is measured too (from /proc), and with --data-dir the disk of the
journal stream and of the quorum queues' data.

    .venv/bin/python bench/journal.py --url amqp://guest:guest@localhost:5730/%2F \\
        --broker-pid $(scripts/broker pid) --data-dir <node data dir> --pending 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import aio_pika

from rmqdelay import Scheduler, Settings, TaskSpec
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

DESTINATION = "bench"
PAYLOAD = {"order": 12345, "action": "remind"}
#: Delays of the runs: one through the levels, one within the hold window.
DELAYS = {"1h": 3600.0, "5s": 5.0}


def _ticks(pid: int | None) -> float:
    """The broker's CPU seconds so far (user + system), or 0 without a pid."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def schedule_rate(
    scheduler: Scheduler, count: int, inflight: int, delay: float, pid: int | None
) -> tuple[float, float]:
    """Tasks a second, and broker CPU microseconds a task."""
    window = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with window:
            await scheduler.schedule(DESTINATION, PAYLOAD, delay=delay)

    cpu, wall = _ticks(pid), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    wall, cpu = time.perf_counter() - wall, _ticks(pid) - cpu
    return count / wall, cpu / count * 1e6


async def schedule_many_rate(
    scheduler: Scheduler, count: int, batch: int, delay: float, pid: int | None
) -> tuple[float, float]:
    specs = [TaskSpec(DESTINATION, PAYLOAD, delay=delay) for _ in range(batch)]
    cpu, wall = _ticks(pid), time.perf_counter()
    for _ in range(count // batch):
        await scheduler.schedule_many(specs)
    done = count // batch * batch
    wall, cpu = time.perf_counter() - wall, _ticks(pid) - cpu
    return done / wall, cpu / done * 1e6


async def purge_all(settings: Settings) -> None:
    """Empty the levels and the work queue, so both namespaces hold the same."""
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        for spec in build_topology(settings.layout, (DESTINATION,)).queues:
            if spec.arguments.get("x-queue-type") != "stream":
                await (await channel.declare_queue(spec.name, passive=True)).purge()


def du(path: Path) -> int:
    """Bytes under ``path`` (0 if it is not there)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def rss(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def pending_costs(args: argparse.Namespace, on: Settings) -> None:
    """Memory and disk per pending task, and lookups over that many (journal on)."""
    data = Path(args.data_dir) if args.data_dir else None
    journal_dir = None
    if data is not None:
        prefix = f"__{on.namespace}_journal_"
        journal_dir = next(
            (p for p in (data / "stream").iterdir() if p.name.startswith(prefix)), None
        )
    quorum = data / "quorum" if data is not None else None
    before = (
        rss(args.broker_pid),
        du(journal_dir) if journal_dir else 0,
        du(quorum) if quorum else 0,
    )
    specs = [TaskSpec(DESTINATION, PAYLOAD, delay=7200 + i % 3600) for i in range(1000)]
    async with Scheduler(on) as scheduler:
        started = time.perf_counter()
        for _ in range(args.pending // 1000):
            await scheduler.schedule_many(specs)
        took = time.perf_counter() - started
        await asyncio.sleep(5)  # let the broker settle its memory before reading it
        after = (
            rss(args.broker_pid),
            du(journal_dir) if journal_dir else 0,
            du(quorum) if quorum else 0,
        )
        n = args.pending // 1000 * 1000
        print(f"\n{n} pending tasks (scheduled in {took:.1f}s), journal on:")
        print(f"  broker RSS      +{(after[0] - before[0]) / n:7.0f} B a task")
        print(f"  journal on disk +{(after[1] - before[1]) / n:7.0f} B a task")
        print(f"  quorum data     +{(after[2] - before[2]) / n:7.0f} B a task (levels: the tasks)")
        for what, call in (
            ("get(id)", lambda: scheduler.get("nope")),
            ("find() first page", lambda: scheduler.find(limit=100)),
        ):
            started = time.perf_counter()
            await call()
            print(f"  {what:18} {time.perf_counter() - started:6.2f}s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_TEST_URL", "amqp://localhost/"))
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--inflight", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker-pid", type=int)
    parser.add_argument("--data-dir", help="the broker node's data directory (for disk use)")
    parser.add_argument("--pending", type=int, default=0, help="then measure this many pending")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    common = {"url": args.url, "max_delay": timedelta(days=1)}
    on = Settings(_env_file=None, namespace=f"jon-{tag}", journal=True, **common)
    off = Settings(_env_file=None, namespace=f"joff-{tag}", journal=False, **common)
    for settings in (on, off):
        await apply_topology(settings, build_topology(settings.layout, (DESTINATION,)))
    rates: dict[str, list[tuple[float, float]]] = {}
    try:
        async with Scheduler(on) as with_journal, Scheduler(off) as without:
            for i in range(args.rounds):
                order = [("on", with_journal, on), ("off", without, off)]
                for name, scheduler, settings in order if i % 2 == 0 else order[::-1]:
                    for label, delay in DELAYS.items():
                        rate = await schedule_rate(
                            scheduler, args.count, args.inflight, delay, args.broker_pid
                        )
                        rates.setdefault(f"schedule() {label} journal {name}", []).append(rate)
                        rate = await schedule_many_rate(
                            scheduler, args.count, args.inflight, delay, args.broker_pid
                        )
                        rates.setdefault(f"schedule_many() {label} journal {name}", []).append(rate)
                        await purge_all(settings)
        print(f"{args.count} tasks per run, {args.rounds} rounds, {args.inflight} in flight")
        for name, values in rates.items():
            print(
                f"  {name:32} median {statistics.median(v[0] for v in values):6.0f}/s, "
                f"broker {statistics.median(v[1] for v in values):5.0f} us CPU/task; rounds: "
                + ", ".join(f"{rate:.0f}" for rate, _ in values)
            )
        for call in ("schedule()", "schedule_many()"):
            for label in DELAYS:
                a, b = rates[f"{call} {label} journal on"], rates[f"{call} {label} journal off"]
                ratio = statistics.median(x[0] / y[0] for x, y in zip(a, b, strict=True))
                cpu = statistics.median(x[1] / y[1] for x, y in zip(a, b, strict=True) if y[1])
                print(f"  {call} {label}: rate on/off {ratio:.2f}x, broker CPU on/off {cpu:.2f}x")
        if args.pending:
            await pending_costs(args, on)
    finally:
        for settings in (on, off):
            await apply_topology(
                settings, build_topology(settings.layout, (DESTINATION,)), delete=True
            )


if __name__ == "__main__":
    asyncio.run(main())
