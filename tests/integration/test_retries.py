"""Retries through the delay levels, timeouts, and parking, against a real broker."""

from __future__ import annotations

import asyncio
import itertools
import time

import aio_pika
import pytest

from rmqdelay import Retry, RetryPolicy, Scheduler, Settings, Task
from rmqdelay.core.wire import (
    PARKED_ATTEMPTS,
    PARKED_DESTINATION,
    PARKED_ERROR,
    PARKED_REASON,
    TASK_ID,
    route_headers,
    task_headers,
)

from .conftest import make_settings
from .helpers import Recorder, get_all, running_worker

pytestmark = pytest.mark.integration
#: Lateness a hop may add on a loaded machine, on top of the backoff's own range.
SLACK_S = 0.35


def _parked_for(messages: list[aio_pika.abc.AbstractIncomingMessage], task_id: str) -> dict:  # type: ignore[type-arg]
    found = [m.headers for m in messages if m.headers.get(TASK_ID) == task_id]
    assert len(found) == 1, f"expected one parked copy of {task_id}, found {len(found)}"
    return found[0]


async def test_always_failing_handler_runs_max_attempts_at_the_backoff_then_parks(
    settings: Settings, destination: str
) -> None:
    runs: list[tuple[int, float]] = []

    async def broken(task: Task) -> None:
        runs.append((task.attempt, time.time()))
        raise ValueError(f"boom on attempt {task.attempt}")

    policy = RetryPolicy(max_attempts=3, base_ms=300, cap_ms=1000)
    async with (
        running_worker(settings, destination, broken, retry=policy) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule(destination, {}, delay=0)
        async with asyncio.timeout(15):
            await worker.wait_for(lambda st: st.parked == 1)
    assert [attempt for attempt, _ in runs] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(runs)]
    assert 0.15 <= gaps[0] <= 0.3 + SLACK_S, gaps
    assert 0.3 <= gaps[1] <= 0.6 + SLACK_S, gaps
    assert (worker.stats.retried, worker.stats.executed) == (2, 0)
    parked = _parked_for(await get_all(settings, settings.names.parked, ack=True), s.id)
    assert parked[PARKED_REASON] == "ValueError: boom on attempt 3 (attempt 3 of 3)"
    assert parked[PARKED_ERROR] == "ValueError"
    assert parked[PARKED_ATTEMPTS] == 3
    assert parked[PARKED_DESTINATION] == destination


async def test_retry_raised_by_the_handler_runs_again_after_its_delay(
    settings: Settings, destination: str
) -> None:
    runs: list[tuple[int, float]] = []

    async def flaky(task: Task) -> None:
        runs.append((task.attempt, time.time()))
        if task.attempt == 1:
            raise Retry(delay=0.5, reason="upstream busy")

    async with (
        running_worker(settings, destination, flaky) as worker,
        Scheduler(settings) as scheduler,
    ):
        await scheduler.schedule(destination, {}, delay=0)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.executed == 1)
    assert [a for a, _ in runs] == [1, 2]
    assert 0.5 <= runs[1][1] - runs[0][1] <= 0.5 + SLACK_S
    assert worker.stats.retried == 1


async def test_per_task_max_attempts_overrides_the_worker(
    settings: Settings, destination: str
) -> None:
    attempts: list[int] = []

    async def broken(task: Task) -> None:
        attempts.append(task.attempt)
        raise RuntimeError("no")

    policy = RetryPolicy(max_attempts=5, base_ms=50, cap_ms=100)
    async with (
        running_worker(settings, destination, broken, retry=policy) as worker,
        Scheduler(settings) as scheduler,
    ):
        await scheduler.schedule(destination, {}, delay=0, max_attempts=2, backoff_base=0.05)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.parked == 1)
    assert attempts == [1, 2]
    await get_all(settings, settings.names.parked, ack=True)


async def test_a_handler_past_its_timeout_has_failed(
    broker_url: str, settings: Settings, destination: str
) -> None:
    impatient = make_settings(
        broker_url, namespace=settings.namespace, handler_timeout="200ms", max_attempts=2,
        backoff_base="50ms",
    )  # fmt: skip

    async def hangs(task: Task) -> None:
        await asyncio.sleep(30)  # simulated hang

    async with (
        running_worker(impatient, destination, hangs) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule(destination, {}, delay=0)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.parked == 1)
    parked = _parked_for(await get_all(settings, settings.names.parked, ack=True), s.id)
    assert parked[PARKED_ERROR] == "HandlerTimeoutError"
    assert "longer than 0.2s" in parked[PARKED_REASON]


async def test_a_cancel_hits_a_task_waiting_for_its_retry(
    settings: Settings, destination: str
) -> None:
    attempts: list[int] = []
    failed = asyncio.Event()

    async def broken(task: Task) -> None:
        attempts.append(task.attempt)
        failed.set()
        raise RuntimeError("first attempt fails")

    policy = RetryPolicy(max_attempts=3, base_ms=1000, cap_ms=1000)
    async with (
        running_worker(settings, destination, broken, retry=policy) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule(destination, {}, delay=0)
        await asyncio.wait_for(failed.wait(), 10)
        await scheduler.cancel(s.id)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.cancelled == 1)
    assert attempts == [1]


async def test_garbage_is_parked_with_a_reason_and_good_tasks_keep_running(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    now_ms = int(time.time() * 1000)
    good_headers = task_headers(
        "garbage-ok-headers", due_ms=now_ms, published_ms=now_ms, route=route_headers(())
    )
    garbage = {
        "not json": aio_pika.Message(
            b"{nope", headers={**good_headers, TASK_ID: "g1"}, content_type="application/json"
        ),
        "no headers": aio_pika.Message(b"{}", content_type="application/json"),
        "huge headers": aio_pika.Message(
            b"{}",
            headers={**good_headers, TASK_ID: "g3", "x-junk": "j" * 100_000},
            content_type="application/json",
        ),
        "unknown content type": aio_pika.Message(
            b"<x/>", headers={**good_headers, TASK_ID: "g4"}, content_type="application/xml"
        ),
        "no content type": aio_pika.Message(b"{}", headers={**good_headers, TASK_ID: "g5"}),
    }
    async with (
        running_worker(settings, destination, recorder) as worker,
        Scheduler(settings) as scheduler,
    ):
        connection = await aio_pika.connect(settings.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for message in garbage.values():
                await channel.default_exchange.publish(
                    message, settings.names.work_queue(destination)
                )
        good = await scheduler.schedule(destination, {"ok": True}, delay=0)
        await recorder.wait_for({good.id}, within=10)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.parked == 4)
    parked = await get_all(settings, settings.names.parked, ack=True)
    reasons = sorted(m.headers[PARKED_REASON][:60] for m in parked)
    assert len(parked) == 4, reasons
    assert any("has no content_type" in r for r in reasons)
    assert any("not valid JSON" in r for r in reasons)
    assert any(f"header '{TASK_ID}'" in r for r in reasons)
    assert any("application/xml" in r for r in reasons)
    assert "g3" in recorder.ids  # huge headers are still a valid task
