"""Incident escalation: escalate an incident at its deadline unless it was resolved first.

Six incidents open with deadlines seconds away. Two are resolved in time, so their
escalations must never fire; one deadline is looked up and moved (``reschedule``: the
caller does not keep the payload), so only the new one fires; the rest escalate. Prints
what happened; exits 1 if anything fired that should not have, or failed to fire.

    RMQDELAY_URL=amqp://... python examples/incident_escalation.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import timedelta

from rmqdelay import Scheduler, Settings, Task, Worker

DESTINATION = "escalations"
DEADLINES_S = {1: 1.0, 2: 1.2, 3: 1.4, 4: 5.0, 5: 1.8, 6: 2.0}
RESOLVED = {1, 3}
MOVED = {4: 6.0}  # incident 4 gets more time: 6 s from when it is moved


async def main() -> int:
    settings = Settings()
    escalated: dict[int, float] = {}
    moved_due: dict[int, float] = {}

    async def escalate(task: Task) -> None:
        incident = task.payload["incident"]
        escalated[incident] = time.time()
        print(f"  ESCALATE incident {incident} to the manager (deadline {task.due_at:%H:%M:%S.%f})")

    stop = asyncio.Event()
    worker = Worker(settings, DESTINATION, escalate)
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(worker.ready.wait(), 60)
        async with Scheduler(settings) as scheduler:
            for incident, seconds in DEADLINES_S.items():
                await scheduler.schedule(
                    DESTINATION,
                    {"incident": incident},
                    delay=timedelta(seconds=seconds),
                    keys=[f"incident:{incident}"],
                )
                print(f"opened incident {incident}, escalates in {seconds} s unless resolved")
            for incident in sorted(RESOLVED):
                await scheduler.cancel(f"incident:{incident}")
                print(f"resolved incident {incident}: its escalation is cancelled")
            for incident, seconds in MOVED.items():
                page = await scheduler.find(key=f"incident:{incident}")
                for pending in page.tasks:
                    due = f"{pending.due_at:%H:%M:%S}"
                    print(f"incident {incident}: escalation {pending.id} pending, due {due}")
                s = await scheduler.reschedule(
                    f"incident:{incident}", delay=timedelta(seconds=seconds)
                )
                moved_due[incident] = s.due_at.timestamp()
                print(f"moved incident {incident}'s deadline to {seconds} s from now")
        should_fire = set(DEADLINES_S) - RESOLVED
        skipped = len(RESOLVED) + len(MOVED)  # the cancelled and the superseded escalations
        async with asyncio.timeout(max(DEADLINES_S.values()) + max(MOVED.values()) + 30):
            await worker.wait_for(
                lambda stats: should_fire <= escalated.keys() and stats.cancelled >= skipped
            )
    finally:
        stop.set()
        await running

    wrong = escalated.keys() - should_fire
    missing = should_fire - escalated.keys()
    early_moves = [i for i, due in moved_due.items() if escalated.get(i, due) < due]
    print(
        f"escalated {sorted(escalated)}; skipped {worker.stats.cancelled} cancelled escalations; "
        f"wrongly fired {sorted(wrong)}; missing {sorted(missing)}; "
        f"moved deadlines fired early {early_moves}"
    )
    return 1 if wrong or missing or early_moves or worker.stats.cancelled != skipped else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
