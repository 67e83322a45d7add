"""What another language's publisher may get wrong in the wire format: times in another
unit, a cancel stamped far ahead, ids and keys over the limits. Nothing runs at once or is
suppressed for ever without a word: tasks are parked with the likely mistake named,
records ignored with a warning."""

from __future__ import annotations

import asyncio
import time
import uuid

import pika
import pytest

from rmqdelay import RetryPolicy, Scheduler, Settings, Task
from rmqdelay.core.wire import PARKED_REASON, cancel_headers
from rmqdelay.tools.parking import ParkingLot

from .helpers import Recorder, logged, running_worker

pytestmark = pytest.mark.integration


def _publish(
    settings: Settings, exchange: str, routing_key: str, headers: dict[str, object]
) -> None:
    """Publish as a plain AMQP client (pika) would, confirmed."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=b"{}",
            properties=pika.BasicProperties(
                content_type="application/json", delivery_mode=2, headers=headers
            ),
            mandatory=True,
        )
    finally:
        connection.close()


def _task(task_id: str, due: int, published: int, **more: object) -> dict[str, object]:
    return {
        "rmqdelay-id": task_id,
        "rmqdelay-due": due,
        "rmqdelay-published": published,
        "rmqdelay-route-in": "work",
        **more,
    }


async def test_times_and_keys_a_publisher_got_wrong_are_parked_with_the_mistake_named(
    own_settings: Settings,
) -> None:
    settings, now_ms = own_settings, int(time.time() * 1000)
    wrong = {
        "in-seconds": (_task("in-seconds", now_ms // 1000, now_ms), "would be one in seconds"),
        "in-micros": (_task("in-micros", now_ms * 1000, now_ms), "would be one in microseconds"),
        "negative": (_task("negative", -1, now_ms), "a time before 1970"),
        "33-keys": (
            _task("33-keys", now_ms, now_ms, **{"rmqdelay-keys": [f"k{n}" for n in range(33)]}),
            "at most 32 keys",
        ),
        "long-key": (
            _task("long-key", now_ms, now_ms, **{"rmqdelay-keys": ["x" * 300]}),
            "the limit is 255",
        ),
    }
    recorder = Recorder()
    async with running_worker(settings, "dest", recorder) as worker:
        for headers, _ in wrong.values():
            await asyncio.to_thread(
                _publish, settings, f"{settings.namespace}.schedule", "dest", headers
            )
        async with asyncio.timeout(20):
            await worker.wait_for(lambda st: st.parked == len(wrong))
    assert recorder.runs == [], "none of them ran"
    async with Scheduler(settings) as scheduler:
        lot = ParkingLot(scheduler)
        for task_id, (_, says) in wrong.items():
            shown = await lot.show(task_id)
            assert shown is not None, task_id
            assert says in str(shown.headers[PARKED_REASON]), (task_id, shown.headers)


async def test_a_cancel_stamped_far_ahead_is_ignored_with_a_warning_not_kept_for_ever(
    own_settings: Settings,
) -> None:
    settings = own_settings
    key = f"order:{uuid.uuid4().hex[:6]}"
    tomorrow_ms = int(time.time() * 1000) + 86_400_000
    recorder = Recorder()
    with logged("rmqdelay.broker.cancels", f"ignoring the cancel of key {key!r}") as ignored:
        async with running_worker(settings, "dest", recorder):
            # A due time where the time of the cancel belongs: it would call off every task
            # under the key scheduled until tomorrow.
            await asyncio.to_thread(
                _publish, settings, "", settings.names.cancels, cancel_headers(key, tomorrow_ms)
            )
            async with asyncio.timeout(20):
                await ignored.wait()
            async with Scheduler(settings) as scheduler:
                s = await scheduler.schedule("dest", {}, delay=0.3, keys=[key])
            await recorder.wait_for({s.id}, within=20)


async def test_a_task_due_days_before_its_publish_time_runs_now_with_a_warning(
    own_settings: Settings,
) -> None:
    settings, now_ms = own_settings, int(time.time() * 1000)
    recorder = Recorder()
    with logged("rmqdelay.worker", "days before its publish time") as warned:
        async with running_worker(settings, "dest", recorder):
            headers = _task("last-week", now_ms - 7 * 86_400_000, now_ms)
            await asyncio.to_thread(
                _publish, settings, f"{settings.namespace}.schedule", "dest", headers
            )
            await recorder.wait_for({"last-week"}, within=20)
    assert warned.is_set()


async def test_a_bad_task_does_not_stop_the_good_ones(own_settings: Settings) -> None:
    settings, now_ms = own_settings, int(time.time() * 1000)

    async def good(task: Task) -> None:
        await recorder(task)

    recorder = Recorder()
    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with running_worker(settings, "dest", good, retry=once) as worker:
        await asyncio.to_thread(
            _publish, settings, f"{settings.namespace}.schedule", "dest",
            _task("bad", now_ms // 1000, now_ms),
        )  # fmt: skip
        async with Scheduler(settings) as scheduler:
            s = await scheduler.schedule("dest", {}, delay=0)
        await recorder.wait_for({s.id}, within=20)
        async with asyncio.timeout(20):
            await worker.wait_for(lambda st: st.parked == 1)
