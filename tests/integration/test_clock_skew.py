"""A publisher whose clock runs ahead of or behind the worker's.

"Never early" is read on the worker's clock: a task never starts before the due time its
publisher stamped (its clock at schedule() plus the delay). The levels hold a task for
relative times (TTLs), so by true time a publisher whose clock is behind can make a task
start early only by what the last hop leaves to the worker (the hold window and one
resolution unit); one whose clock is ahead makes its tasks that much late.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from rmqdelay import Settings

from .helpers import Recorder, logged, running_worker, subprocess_env

pytestmark = pytest.mark.integration

SKEW_S = 5.0
DELAY_S = 3.0
COUNT = 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("skew_s", [SKEW_S, -SKEW_S], ids=["ahead", "behind"])
async def test_never_early_on_the_workers_clock_whichever_way_the_publishers_runs(
    own_settings: Settings, skew_s: float
) -> None:
    settings, destination, recorder = own_settings, "dest", Recorder()
    with logged("rmqdelay.worker.clocks", "ahead of this worker's clock") as warned:
        async with running_worker(settings, destination, recorder):
            sent_at = time.time()  # true time: this process's clock is not shifted
            publisher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.integration.skewed",
                str(skew_s), destination, str(COUNT), str(DELAY_S),
                env=subprocess_env(settings), stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(publisher.communicate(), 60)
            assert publisher.returncode == 0
            scheduled = {t["id"]: t["due_ms"] for t in map(json.loads, out.splitlines())}
            assert len(scheduled) == COUNT
            await recorder.wait_for(set(scheduled), within=30 + SKEW_S)
    assert max(recorder.counts.values()) == 1
    first_runs = {task.id: ran for task, ran in reversed(recorder.runs)}
    for task_id, ran in first_runs.items():
        # Never early, on the worker's clock, against the due time its publisher stamped.
        assert ran * 1000 >= scheduled[task_id], (task_id, ran * 1000 - scheduled[task_id])
    true_due = sent_at + DELAY_S
    slack = settings.hold_window_s + settings.resolution_ms / 1000
    earliest = min(first_runs.values())
    on_true = sorted(ran - true_due for ran in first_runs.values())
    on_worker = sorted(ran - scheduled[i] / 1000 for i, ran in first_runs.items())
    print(
        f"\npublisher {skew_s:+g}s: start minus due, on true time {on_true[0]:+.3f}.."
        f"{on_true[-1]:+.3f}s, on the worker's clock {on_worker[0]:+.3f}..{on_worker[-1]:+.3f}s"
    )
    if skew_s > 0:
        # Late by the publisher's lead, and the worker says whose clock is ahead.
        assert earliest >= true_due + skew_s - 0.1, earliest - true_due
        assert warned.is_set(), "no warning of a publisher's clock ahead"
    else:
        # The TTLs kept the true delay: early on true time by at most the last hop's slack.
        assert earliest >= true_due - slack, earliest - true_due
        assert not warned.is_set()
