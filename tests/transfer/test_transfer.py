"""``transfer`` from one broker to another (RabbitMQ 3.10 to 4.3 in CI) with 10,000 tasks
pending, a worker on each side, and publishers already using the target."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from rmqdelay import Scheduler, Settings, TaskSpec
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology
from rmqdelay.tools import moving
from tests.integration.conftest import make_settings
from tests.integration.helpers import Recorder, running_worker

pytestmark = pytest.mark.integration

PENDING = 10_000


async def _namespace(url: str) -> Settings:
    settings = make_settings(url, max_delay=timedelta(hours=1), prefetch=512, concurrency=64)
    await apply_topology(settings, build_topology(settings.layout, ("dest",)))
    return settings


@pytest.fixture
async def source(broker_url: str) -> AsyncIterator[Settings]:
    settings = await _namespace(broker_url)
    yield settings
    await apply_topology(settings, build_topology(settings.layout, ("dest",)), delete=True)


@pytest.fixture
async def target(target_url: str) -> AsyncIterator[Settings]:
    settings = await _namespace(target_url)
    yield settings
    await apply_topology(settings, build_topology(settings.layout, ("dest",)), delete=True)


@pytest.mark.timeout(300)
async def test_ten_thousand_pending_tasks_move_none_lost_none_early_none_twice(
    source: Settings, target: Settings
) -> None:
    rng = random.Random(7)
    recorder = Recorder()  # both fleets: a task that ran on each side counts twice
    async with (
        running_worker(source, "dest", recorder) as source_worker,
        running_worker(target, "dest", recorder),
        Scheduler(source) as old,
        Scheduler(target) as new,
    ):
        specs = [
            TaskSpec("dest", {"i": i}, delay=rng.uniform(60, 90), keys=[f"doomed:{i}"])
            for i in range(PENDING)
        ]
        scheduled = []
        for start in range(0, len(specs), 1000):
            scheduled += await old.schedule_many(specs[start : start + 1000])
        # Publishers use the target already: new tasks, and cancels of tasks still on the
        # source, which must hold for those tasks once they arrive.
        native = [await new.schedule("dest", {"native": i}, delay=5) for i in range(100)]
        for i in range(50):
            await new.cancel(f"doomed:{i}")
        soon = [TaskSpec("dest", {"soon": i}, delay=rng.uniform(1, 4)) for i in range(100)]
        scheduled += await old.schedule_many(soon)
        started = time.monotonic()
        counts = await moving.transfer(old, new, margin_s=15.0)
        took = time.monotonic() - started
        doomed = {t.id for t in scheduled[:50]}
        expected = {t.id for t in scheduled} - doomed
        # The rest came due while the transfer began, and ran on the source.
        assert counts.tasks + counts.left <= len(expected), counts
        assert counts.tasks >= 0.9 * (PENDING - len(doomed)), counts
        assert counts.already == len(doomed), counts  # cancelled there: not sent
        assert counts.left > 0, counts  # the 1-4 s tasks stay with the source's workers
        assert counts.late == 0, counts  # else those may run twice: the broker was slow
        await recorder.wait_for(expected | {t.id for t in native}, within=120)
        async with asyncio.timeout(30):  # every copy that moved is skipped on the source
            await source_worker.wait_for(lambda s: s.cancelled == counts.tasks + len(doomed))
    assert set(recorder.counts) == expected | {t.id for t in native}, "cancelled tasks ran"
    assert max(recorder.counts.values()) == 1, "a task ran twice"
    for task, at in recorder.runs:
        assert at >= task.due_at.timestamp(), f"{task.id} ran early"
    print(f"\nmoved {counts.tasks} tasks in {took:.1f}s; {counts.left} left to the source")
