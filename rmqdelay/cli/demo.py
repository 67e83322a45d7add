"""``rmqdelay demo``: a short live run a new user can watch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.cli.arguments import hops
from rmqdelay.core.task import Task
from rmqdelay.settings import Settings
from rmqdelay.worker.consume import Worker

DESTINATION = "demo"
#: Longest first: in one queue with per-message TTLs, every shorter task would wait behind
#: the 6 s one at the head and arrive seconds late.
DELAYS_MS = (6000, 4000, 3000, 2000, 1000, 500, 250, 100, 0)
_DEADLINE_S = 30.0


def _clock(moment: datetime) -> str:
    return moment.astimezone().strftime("%H:%M:%S.%f")[:-3]


async def run_demo(settings: Settings, out: Callable[[str], None] = print) -> int:
    """Schedule tasks, cancel one, move one, execute them, print each with its lateness.

    Returns 0 when every task ran exactly once, none early, and no cancelled one ran.
    """
    ran: dict[str, float] = {}
    expected: set[str] = set()

    async def on_task(task: Task) -> None:
        late_ms = (time.time() - task.due_at.timestamp()) * 1000
        ran.setdefault(task.id, late_ms)
        out(f"  ran {task.payload['name']:<26} due {_clock(task.due_at)}  late {late_ms:6.1f} ms")

    stop = asyncio.Event()
    worker = Worker(settings, DESTINATION, on_task)
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), timeout=60)
        out(f"rmqdelay demo on {settings.safe_url}, namespace {settings.namespace!r}")
        out(f"scheduling {len(DELAYS_MS) + 2} tasks, longest delay first; each prints as it runs:")
        async with Scheduler(settings) as scheduler:

            async def schedule(
                name: str, ms: int, keys: tuple[str, ...] = (), replace: bool = False
            ) -> str:
                s = await scheduler.schedule(
                    DESTINATION,
                    {"name": name},
                    delay=timedelta(milliseconds=ms),
                    keys=keys,
                    replace=replace,
                )
                out(f"  scheduled {name:<26} due {_clock(s.due_at)}  ({hops(s.hops)})")
                return s.id

            for ms in DELAYS_MS:
                expected.add(await schedule(f"after {ms} ms", ms))
            doomed = await schedule("escalate incident 7", 3500, keys=("incident:7",))
            await schedule("reminder 1 (first time)", 5000, keys=("reminder:1",))
            await scheduler.cancel("incident:7")
            out("  cancelled incident:7 (resolved in time): its escalation must never run")
            moved = await schedule("reminder 1 (moved)", 1500, keys=("reminder:1",), replace=True)
            expected.add(moved)
            out("  rescheduled reminder:1 from 5000 ms to 1500 ms: only the new one may run")
        async with asyncio.timeout(max(DELAYS_MS) / 1000 + _DEADLINE_S):
            await worker.wait_for(lambda s: expected <= ran.keys() and s.cancelled >= 2)
    finally:
        stop.set()
        await running
    early = [late for late in ran.values() if late < 0]
    wrong = ran.keys() - expected
    out(
        f"summary: {len(expected & ran.keys())}/{len(expected)} executed, {len(early)} early, "
        f"{worker.stats.cancelled} cancelled and skipped, {len(wrong)} ran that should not; "
        f"max lateness {max(ran.values()):.1f} ms. One queue with per-message TTLs would have "
        f"held the {DELAYS_MS[-2]} ms task behind the {DELAYS_MS[0]} ms one."
    )
    ok = expected <= ran.keys() and not early and not wrong and doomed not in ran
    return 0 if ok else 1
