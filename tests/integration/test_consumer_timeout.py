"""Handlers that outlive RabbitMQ's consumer timeout: the broker takes the task back
(4.3 cancels the consumer and delivers the task again; older brokers close the channel)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta

import pytest

from rmqdelay import Scheduler, Settings, Task
from rmqdelay.broker.cancels import load_cancels
from rmqdelay.core.retry import RetryPolicy
from rmqdelay.core.wire import PUBLISHED_MS

from .helpers import logged, running_worker

pytestmark = pytest.mark.integration

#: Short, so that the tests take seconds: the worker sets it on its consumer (3.12+).
TIMEOUT = timedelta(seconds=4)


class Runs:
    """Each run of a handler, as (task, start, end), on the monotonic clock."""

    def __init__(self) -> None:
        self.runs: list[tuple[Task, float, float | None]] = []
        self.changed = asyncio.Event()

    def start(self, task: Task) -> int:
        self.runs.append((task, time.monotonic(), None))
        self.changed.set()
        return len(self.runs) - 1

    def end(self, i: int) -> None:
        task, started, _ = self.runs[i]
        self.runs[i] = (task, started, time.monotonic())
        self.changed.set()

    async def until(self, ended: int, within: float) -> None:
        async with asyncio.timeout(within):
            while sum(end is not None for _, _, end in self.runs) < ended:
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.timeout(120)
async def test_a_long_handler_is_stopped_before_the_timeout_and_retried_never_twice_at_once(
    settings: Settings, destination: str
) -> None:
    settings = settings.model_copy(update={"consumer_timeout": TIMEOUT})
    runs = Runs()

    async def slow_the_first_time(task: Task) -> None:
        i = runs.start(task)
        try:
            if task.attempt == 1:
                await asyncio.sleep(60)
        finally:
            runs.end(i)

    retry = RetryPolicy(max_attempts=3, base_ms=100, cap_ms=100)
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"long": True}, delay=0)
        with logged("aiormq.channel", "cancelled by the broker") as broker_cancelled:
            async with running_worker(
                settings, destination, slow_the_first_time, retry=retry
            ) as worker:
                await runs.until(2, within=60)
                assert worker.stats.overran == 0
                assert worker.stats.retried == 1
        assert not broker_cancelled.is_set(), "the broker's consumer timeout fired"
    (first, started1, ended1), (second, started2, _) = runs.runs
    assert first.id == second.id == s.id
    assert (first.attempt, second.attempt) == (1, 2)
    assert ended1 is not None
    # Stopped a tenth of the timeout before it: 3.6 s after its delivery.
    assert 3.0 < ended1 - started1 < TIMEOUT.total_seconds(), ended1 - started1
    print(f"\nstopped after {ended1 - started1:.2f}s of a {TIMEOUT.total_seconds():g}s timeout")
    assert started2 >= ended1, "the retry ran while the first run was still going"


@pytest.mark.timeout(120)
async def test_a_handler_that_ignores_its_stop_is_reported_and_its_copies_cancelled(
    settings: Settings, destination: str, test_broker_version: tuple[int, int]
) -> None:
    if test_broker_version < (3, 12):
        pytest.skip(
            f"RabbitMQ {test_broker_version} has no per-consumer timeout: its own "
            "consumer_timeout (30 min) applies, too long for a test"
        )
    settings = settings.model_copy(update={"consumer_timeout": TIMEOUT})
    runs = Runs()

    async def stubborn_the_first_time(task: Task) -> None:
        i = runs.start(task)
        try:
            if i == 0:
                ends = time.monotonic() + 7
                while (left := ends - time.monotonic()) > 0:
                    try:
                        await asyncio.sleep(left)
                    except asyncio.CancelledError:
                        pass  # the worker's stop, ignored: what this test is about
        finally:
            runs.end(i)

    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"stubborn": True}, delay=0)
        with logged("rmqdelay.worker.consume", "past RabbitMQ's consumer timeout") as told:
            async with (
                running_worker(settings, destination, stubborn_the_first_time) as a,
                running_worker(settings, destination, stubborn_the_first_time) as b,
            ):
                await runs.until(2, within=60)
                await asyncio.wait_for(told.wait(), 10)
                published_ms = runs.runs[0][0].headers[PUBLISHED_MS]
                assert a.stats.overran + b.stats.overran == 1
                # The overrun run succeeded: its copies published before now are cancelled.
                async with asyncio.timeout(20):
                    while True:
                        cancels = await load_cancels(settings)
                        if cancels.cancelled_by([s.id], published_ms) is not None:
                            break
                        await asyncio.sleep(0.2)
    (first, _, ended1), (second, started2, _) = runs.runs[:2]
    assert first.id == second.id == s.id
    assert ended1 is not None
    # The broker took it back at its timeout and gave it again, while the first still ran:
    # the case the ERROR line is for.
    assert started2 < ended1
    print(f"\ngiven again {started2 - runs.runs[0][1]:.2f}s after the first start")
    assert second.redelivered
    assert len(runs.runs) == 2, "a copy ran after the overrun run succeeded"


@pytest.mark.timeout(60)
async def test_a_plain_handler_left_running_in_its_thread_is_reported(
    settings: Settings, destination: str
) -> None:
    """A thread cannot be stopped: when the worker stops waiting for one (its timeout), the
    task is retried while the thread may still work on it, and the log says so."""
    release = threading.Event()
    seen: list[int] = []

    def blocking(task: Task) -> None:
        seen.append(task.attempt)
        if task.attempt == 1:
            release.wait(10)

    retry = RetryPolicy(max_attempts=2, base_ms=1, cap_ms=1)
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {}, delay=0)
        with logged("rmqdelay.worker.handler", f"still running task {s.id}") as told:
            async with running_worker(
                settings, destination, blocking, retry=retry, handler_timeout=timedelta(seconds=1)
            ) as worker:
                await asyncio.wait_for(told.wait(), 20)
                await asyncio.wait_for(worker.wait_for(lambda s: s.executed >= 1), 20)
                release.set()
    assert seen == [1, 2]
