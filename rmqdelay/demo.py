"""``rmqdelay demo``: a short live run a new user can watch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from rmqdelay.scheduler import Scheduler
from rmqdelay.settings import Settings
from rmqdelay.task import Task
from rmqdelay.worker import Worker

DESTINATION = "demo"
#: Longest first: in one queue with per-message TTLs, every shorter task would wait behind
#: the 6 s one at the head and arrive seconds late.
DELAYS_MS = (6000, 4000, 3000, 2000, 1000, 500, 250, 100, 0)


def _clock(moment: datetime) -> str:
    return moment.astimezone().strftime("%H:%M:%S.%f")[:-3]


async def run_demo(settings: Settings, out: Callable[[str], None] = print) -> int:
    """Schedule a handful of tasks, execute them, print each with its lateness.

    Returns 0 when every task ran exactly once and none early, 1 otherwise.
    """
    done: dict[str, float] = {}
    all_done = asyncio.Event()

    async def on_task(task: Task) -> None:
        late_ms = (time.time() - task.due_at.timestamp()) * 1000
        done.setdefault(task.id, late_ms)
        out(f"  ran {task.payload['name']:<12} due {_clock(task.due_at)}  late {late_ms:6.1f} ms")
        if len(done) == len(DELAYS_MS):
            all_done.set()

    stop = asyncio.Event()
    worker = Worker(settings, DESTINATION, on_task)
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), timeout=60)
        out(f"rmqdelay demo on {settings.safe_url}, namespace {settings.namespace!r}")
        out(f"scheduling {len(DELAYS_MS)} tasks, longest delay first; each prints as it runs:")
        async with Scheduler(settings) as scheduler:
            for ms in DELAYS_MS:
                s = await scheduler.schedule(
                    DESTINATION, {"name": f"after {ms} ms"}, delay=timedelta(milliseconds=ms)
                )
                out(
                    f"  scheduled {'after ' + str(ms) + ' ms':<12} due {_clock(s.due_at)}"
                    f"  ({s.hops} hops)"
                )
        await asyncio.wait_for(all_done.wait(), timeout=max(DELAYS_MS) / 1000 + 30)
    finally:
        stop.set()
        await running
    early = [late for late in done.values() if late < 0]
    out(
        f"summary: {len(done)}/{len(DELAYS_MS)} executed, {len(early)} early, "
        f"max lateness {max(done.values()):.1f} ms; one queue with per-message TTLs would "
        f"have held the {DELAYS_MS[-2]} ms task behind the {DELAYS_MS[0]} ms one."
    )
    return 0 if len(done) == len(DELAYS_MS) and not early else 1
