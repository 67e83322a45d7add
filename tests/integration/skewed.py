"""A publisher whose wall clock runs SKEW seconds off the machine's, for the clock-skew
tests: ``python -m tests.integration.skewed SKEW DESTINATION COUNT DELAY_S``, settings from
the environment. Prints one JSON line per task scheduled: its id and its due time in ms
(on the skewed clock).

The clock is shifted where rmqdelay reads it (``time.time``/``time.time_ns``), before
rmqdelay is imported: every stamp the scheduler writes comes from it, as from a machine
whose clock is off. Monotonic clocks are left alone, as NTP leaves them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta


def main() -> None:
    skew_s, destination, count, delay_s = sys.argv[1:5]
    shift_ns = round(float(skew_s) * 1e9)
    real_ns, real = time.time_ns, time.time
    time.time_ns = lambda: real_ns() + shift_ns
    time.time = lambda: real() + shift_ns / 1e9

    from rmqdelay import Scheduler, Settings

    async def publish() -> None:
        async with Scheduler(Settings()) as scheduler:
            for i in range(int(count)):
                s = await scheduler.schedule(
                    destination, {"i": i}, delay=timedelta(seconds=float(delay_s))
                )
                due_ms = int(s.due_at.timestamp() * 1000)
                print(json.dumps({"id": s.id, "due_ms": due_ms}), flush=True)

    asyncio.run(publish())


if __name__ == "__main__":
    main()
