"""Traces across the delay (rmqdelay[otel]): the W3C trace context schedule() writes goes
through the levels, retries and a forward to the handler, whose execute span is linked to
the schedule span; hold, execute, retry and park are spans of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from rmqdelay import Retry, RetryPolicy, Scheduler, Settings, Task
from rmqdelay.broker import tracing
from rmqdelay.tools.forward import Forwarder

from .helpers import running_worker
from .tracing import Spans, ids, spans, traceparent

__all__ = ["spans"]  # the fixture, imported for the tests here

pytestmark = pytest.mark.integration


async def test_the_execute_span_is_linked_to_the_schedule_span_across_the_levels(
    settings: Settings, destination: str, spans: Spans
) -> None:
    seen: list[str] = []

    async def handler(task: Task) -> None:
        # The handler runs inside the execute span: what it traces is that span's child.
        seen.append(format(trace.get_current_span().get_span_context().span_id, "016x"))

    async with running_worker(settings, destination, handler) as worker:
        async with Scheduler(settings) as scheduler:
            tracer = trace.get_tracer("the caller")
            with tracer.start_as_current_span("POST /incidents") as request:
                scheduled = await scheduler.schedule(destination, {"n": 1}, delay=1.0)
        await worker.wait_for(lambda s: s.executed >= 1)

    schedule = spans.one("schedule")
    assert schedule.kind is SpanKind.PRODUCER
    assert schedule.parent is not None
    assert schedule.parent.span_id == request.get_span_context().span_id, "the caller's child"
    assert schedule.attributes is not None
    assert schedule.attributes["messaging.destination.name"] == destination
    assert scheduled.hops >= 1, "through the delay levels, not straight to work"

    execute = spans.one("execute")
    assert execute.kind is SpanKind.CONSUMER
    assert execute.parent is None, "a trace of its own"
    assert [link.context.span_id for link in execute.links] == [
        schedule.get_span_context().span_id  # type: ignore[union-attr]
    ]
    assert execute.attributes is not None
    assert execute.attributes["rmqdelay.task_id"] == scheduled.id
    assert execute.attributes["rmqdelay.outcome"] == "executed"
    assert seen == [format(execute.get_span_context().span_id, "016x")]  # type: ignore[union-attr]

    hold = spans.one("hold")
    assert hold.parent is not None
    assert hold.parent.span_id == schedule.get_span_context().span_id  # type: ignore[union-attr]
    assert hold.start_time is not None
    assert hold.end_time is not None
    assert (hold.end_time - hold.start_time) / 1e9 >= 0.99, "publish to release: the delay"


async def test_every_attempt_links_to_the_schedule_and_retry_and_park_are_spans(
    own_settings: Settings, spans: Spans
) -> None:
    # A namespace of its own: the task ends in its parking lot, which other tests read.
    settings, destination = own_settings, "dest"

    async def handler(task: Task) -> None:
        if task.attempt == 1:
            raise Retry(delay=0.05)
        raise RuntimeError(f"cannot reach {settings.url}")  # the broker's password in it

    policy = RetryPolicy(max_attempts=2, base_ms=50, cap_ms=50)
    async with running_worker(settings, destination, handler, retry=policy) as worker:
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule(destination, {"n": 1}, delay=0.5)
        await worker.wait_for(lambda s: s.parked >= 1)

    schedule = spans.one("schedule").get_span_context()
    assert schedule is not None
    executes = spans.named("execute")
    assert len(executes) == 2
    for execute in executes:
        assert [link.context.span_id for link in execute.links] == [schedule.span_id]
        assert execute.status.status_code is StatusCode.ERROR
    retry, park = spans.one("retry"), spans.one("park")
    assert retry.parent is not None
    assert park.parent is not None
    assert {retry.parent.span_id, park.parent.span_id} == {
        e.get_span_context().span_id  # type: ignore[union-attr]
        for e in executes
    }
    assert park.attributes is not None
    secret = settings.url.split("@")[0]  # amqp://user:password
    assert "cannot reach" in str(park.attributes), "the reason is there"
    assert secret not in str(park.attributes), "redacted, as in the parked headers"
    assert secret not in str([e.status.description for e in executes])


@pytest.fixture
async def target(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("traced-target", auto_delete=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "traced")
        yield queue


async def _forwarded(
    settings: Settings, destination: str, target: aio_pika.abc.AbstractQueue, delay: float
) -> aio_pika.abc.AbstractIncomingMessage:
    """A task scheduled with ``delay``, as a forwarding worker hands it to ``target``."""
    async with (
        Forwarder(settings, "traced-target", "traced") as forwarder,
        running_worker(settings, destination, forwarder, raw=True),
    ):
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule(destination, b"raw", delay=delay, content_type="text/plain")
        async with target.iterator(timeout=30) as messages:
            message = await anext(messages)
            await message.ack()
    return message


async def test_a_forwarded_task_carries_the_schedule_spans_context(
    settings: Settings, destination: str, spans: Spans, target: aio_pika.abc.AbstractQueue
) -> None:
    message = await _forwarded(settings, destination, target, delay=0.5)
    assert ids((message.headers or {})["traceparent"]) == ids(traceparent(spans.one("schedule")))


async def test_without_an_sdk_the_message_gets_no_trace_headers(
    settings: Settings, destination: str, target: aio_pika.abc.AbstractQueue
) -> None:
    # The API alone (as FastAPI installs it) and no provider: tracing is off, for free.
    assert not tracing.recording()
    message = await _forwarded(settings, destination, target, delay=0)
    assert "traceparent" not in (message.headers or {})
