"""The worker's /metrics and /healthz endpoints against a real broker."""

from __future__ import annotations

import asyncio
import json

import pytest

from rmqdelay import RetryPolicy, Scheduler, Settings, Task

from .helpers import get_all, running_worker

pytestmark = pytest.mark.integration


async def _get(address: tuple[str, int], path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", address[1])
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    status = int(response.split()[1])
    return status, response.split("\r\n\r\n", 1)[1]


def _value(text: str, name: str, destination: str) -> float:
    prefix = f'{name}{{destination="{destination}",namespace="'
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert lines, f"no {prefix!r} in the metrics"
    return float(lines[0].rsplit(" ", 1)[1])


async def test_metrics_count_every_outcome_and_health_says_consuming(
    settings: Settings, destination: str
) -> None:
    async def handler(task: Task) -> None:
        if task.payload == "fail":
            raise RuntimeError("no")

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with (
        running_worker(settings, destination, handler, retry=once, metrics_port=0) as worker,
        Scheduler(settings) as scheduler,
    ):
        assert worker.metrics_address is not None
        status, body = await _get(worker.metrics_address, "/healthz")
        assert (status, json.loads(body)) == (200, {"connected": True, "consuming": True})
        await scheduler.schedule(destination, "ok", delay=0)
        await scheduler.schedule(destination, "ok", delay=0.05)
        await scheduler.schedule(destination, "fail", delay=0)
        doomed = await scheduler.schedule(destination, "ok", delay=0.3)
        await scheduler.cancel(doomed.id)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.executed == 2 and s.parked == 1 and s.cancelled == 1)
        status, text = await _get(worker.metrics_address, "/metrics")
        assert status == 200
        assert (await _get(worker.metrics_address, "/nope"))[0] == 404
    await get_all(settings, settings.names.parked, ack=True)
    assert _value(text, "rmqdelay_tasks_executed_total", destination) == 2
    assert _value(text, "rmqdelay_tasks_failed_total", destination) == 1
    assert _value(text, "rmqdelay_tasks_parked_total", destination) == 1
    assert _value(text, "rmqdelay_tasks_cancelled_total", destination) == 1
    assert _value(text, "rmqdelay_task_lateness_seconds_count", destination) == 3
    assert _value(text, "rmqdelay_handler_duration_seconds_count", destination) == 3
    assert _value(text, "rmqdelay_tasks_in_flight", destination) == 0
    assert _value(text, "rmqdelay_connected", destination) == 1
    assert _value(text, "rmqdelay_cancels_behind_seconds", destination) == 0
    assert f'namespace="{settings.namespace}"' in text, "the alert rules select on it"
