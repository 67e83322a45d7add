"""``consume --forward``: delayed messages reach a plain AMQP consumer as they were published."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from rmqdelay import ConfigError, Scheduler, Settings
from rmqdelay.core.wire import task_headers
from rmqdelay.tools.forward import Forwarder, parse_target
from rmqdelay.tools.parking import ParkingLot

from .helpers import running_worker

pytestmark = pytest.mark.integration


class Target:
    """A user's exchange and a plain consumer's queue bound to it (nothing of rmqdelay)."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, exchange: str) -> None:
        self.channel = channel
        self.exchange = exchange
        self.received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def bind(self, routing_key: str) -> None:
        queue = await self.channel.declare_queue(exclusive=True)
        await queue.bind(self.exchange, routing_key)
        await queue.consume(self.received.put, no_ack=True)

    async def next(self, within: float = 30) -> aio_pika.abc.AbstractIncomingMessage:
        return await asyncio.wait_for(self.received.get(), within)


@pytest.fixture
async def target(settings: Settings) -> AsyncIterator[Target]:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        name = f"user-exchange-{uuid.uuid4().hex[:8]}"
        await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=False)
        yield Target(channel, name)
        await channel.exchange_delete(name)


async def _publish_foreign(settings: Settings, destination: str, delay_ms: int) -> str:
    """Schedule as a service in another language would, with properties of its own."""
    task_id = uuid.uuid4().hex
    now_ms = time.time_ns() // 1_000_000
    way = settings.wiring.route(delay_ms * 1000, task_id)
    headers = task_headers(
        task_id, due_ms=now_ms + delay_ms, published_ms=now_ms, route=way.headers
    )
    headers["trace-id"] = "abc-123"
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(way.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                b"<order id='7'/>",
                headers=headers,
                content_type="application/xml",
                content_encoding="identity",
                correlation_id="corr-7",
                reply_to="replies",
                message_id="order-7",
                app_id="shop",
                type="order.due",
                priority=3,
                timestamp=datetime(2026, 11, 24, 8, tzinfo=UTC),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=destination,
        )
    return task_id


async def test_a_forwarded_task_reaches_a_plain_consumer_as_published(
    settings: Settings, destination: str, target: Target
) -> None:
    await target.bind("orders.due")
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
    task_id = await _publish_foreign(settings, destination, delay_ms=600)
    async with (
        Forwarder(settings, target.exchange, "orders.due") as forwarder,
        running_worker(settings, destination, forwarder, raw=True) as worker,
    ):
        message = await target.next()
        await worker.wait_for(lambda s: s.executed >= 1)
    assert message.body == b"<order id='7'/>"
    assert message.routing_key == "orders.due"
    assert message.content_type == "application/xml"
    assert message.content_encoding == "identity"
    assert message.correlation_id == "corr-7"
    assert message.reply_to == "replies"
    assert message.message_id == "order-7"
    assert message.app_id == "shop"
    assert message.type == "order.due"
    assert message.priority == 3
    assert message.timestamp == datetime(2026, 11, 24, 8, tzinfo=UTC)
    assert message.headers == {"trace-id": "abc-123"}, "none of rmqdelay's, no x-death"
    assert worker.stats.executed == 1
    assert task_id


async def test_a_task_delivered_before_leaves_without_the_brokers_counts(
    settings: Settings, destination: str, target: Target
) -> None:
    # Taken and returned twice before it is forwarded: its work queue (quorum) has counted
    # the deliveries (x-delivery-count; 4.3 also x-acquired-count), which must not go on.
    await target.bind("counted")
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
    task_id = await _publish_foreign(settings, destination, delay_ms=0)
    connection = await aio_pika.connect(settings.url)
    async with connection:
        for _ in range(2):
            channel = await connection.channel()
            queue = await channel.get_queue(settings.names.work_queue(destination), ensure=False)
            async with asyncio.timeout(20):
                while (taken := await queue.get(no_ack=False, fail=False)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # the levels deliver it; no event to await
            await taken.reject(requeue=True)  # counted on every version
            await channel.close()
        channel = await connection.channel()
        queue = await channel.get_queue(settings.names.work_queue(destination), ensure=False)
        async with asyncio.timeout(20):
            while (seen := await queue.get(no_ack=False, fail=False)) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert (seen.headers or {}).get("x-delivery-count") == 2, "the broker counted them"
        await seen.nack(requeue=True)
        await channel.close()
    async with (
        Forwarder(settings, target.exchange, "counted") as forwarder,
        running_worker(settings, destination, forwarder, raw=True) as worker,
    ):
        message = await target.next()
        await worker.wait_for(lambda s: s.executed >= 1)
    assert message.message_id == "order-7"
    assert message.headers == {"trace-id": "abc-123"}, task_id


async def test_the_routing_key_defaults_to_the_destination_and_cancels_hold(
    settings: Settings, destination: str, target: Target
) -> None:
    await target.bind(destination)
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        await scheduler.schedule(destination, {"n": 1}, delay=0.4, keys=["off"])
        await scheduler.cancel("off")
        kept = await scheduler.schedule(destination, {"n": 2}, delay=0.5)
    async with (
        Forwarder(settings, target.exchange) as forwarder,
        running_worker(settings, destination, forwarder, raw=True) as worker,
    ):
        message = await target.next()
        await worker.wait_for(lambda s: s.cancelled >= 1 and s.executed >= 1)
    assert message.body == b'{"n":2}'
    assert message.routing_key == destination
    assert message.message_id == kept.id
    assert target.received.empty(), "the cancelled task was not forwarded"


async def test_unroutable_at_the_target_is_parked_and_requeue_delivers_it(
    broker_url: str, target: Target, own_settings: Settings
) -> None:
    settings = own_settings.model_copy(
        update={"max_attempts": 2, "backoff_base": timedelta(milliseconds=100)}
    )
    task_id = await _publish_foreign(settings, "dest", delay_ms=0)
    async with (
        Forwarder(settings, target.exchange, "nobody.listens") as forwarder,
        running_worker(settings, "dest", forwarder, raw=True) as worker,
    ):
        await worker.wait_for(lambda s: s.parked >= 1)
        async with Scheduler(settings) as scheduler:
            lot = ParkingLot(scheduler)
            [parked] = await lot.peek()
            assert parked.id == task_id
            assert target.exchange in parked.reason
            assert "nobody.listens" in parked.reason
            assert parked.attempts == 2
            await target.bind("nobody.listens")  # the operator fixes the binding
            sent, stayed = await lot.requeue([task_id])
            assert (sent, stayed) == (1, [])
        message = await target.next()
    assert message.correlation_id == "corr-7", "properties survive retries and the lot"
    assert message.headers == {"trace-id": "abc-123"}


async def test_a_target_that_refuses_the_message_is_never_acked_away(
    own_settings: Settings, target: Target
) -> None:
    """The task is acked only after the target confirmed: a nack (a full queue that
    rejects publishes) fails the attempt, and the task ends parked, not lost."""
    settings = own_settings.model_copy(
        update={
            "max_attempts": 1,
            "publish_deadline": timedelta(seconds=1),
        }
    )
    full = await target.channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await full.bind(target.exchange, "full")
    async with Scheduler(settings) as scheduler:
        await scheduler.schedule("dest", "refused", delay=0)
    async with (
        Forwarder(settings, target.exchange, "full") as forwarder,
        running_worker(settings, "dest", forwarder, raw=True) as worker,
    ):
        stats = await asyncio.wait_for(worker.wait_for(lambda s: s.parked >= 1), 30)
        async with Scheduler(settings) as scheduler:
            [parked] = await ParkingLot(scheduler).peek()
    assert stats.executed == 0
    assert "refused" in parked.reason or "nack" in parked.reason


async def test_a_missing_exchange_is_refused_at_start(settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"no-such-exchange.*does not exist"):
        async with Forwarder(settings, "no-such-exchange"):
            pass


def test_the_target_splits_at_the_first_colon() -> None:
    assert parse_target("orders") == ("orders", None)
    assert parse_target("orders:due.eu") == ("orders", "due.eu")
    assert parse_target("orders:") == ("orders", "")
    assert parse_target("a:b:c") == ("a", "b:c")
    with pytest.raises(ConfigError, match="names no exchange"):
        parse_target(":key")
    with pytest.raises(ConfigError, match="over 255 bytes"):
        parse_target("x" * 256)


async def test_forwarding_takes_any_content_type_or_none(
    settings: Settings, destination: str, target: Target
) -> None:
    """A plain worker parks a message without a content type; a forwarder passes it on."""
    await target.bind(destination)
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        now_ms = time.time_ns() // 1_000_000
        way = settings.wiring.route(0, "t1")
        channel = await scheduler.connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(way.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                b"\x00\xffnot json",
                headers=task_headers("t1", due_ms=now_ms, published_ms=now_ms, route=way.headers),
            ),
            routing_key=destination,
        )
    async with (
        Forwarder(settings, target.exchange) as forwarder,
        running_worker(settings, destination, forwarder, raw=True),
    ):
        message = await target.next()
    assert message.body == b"\x00\xffnot json"
    assert message.content_type is None


async def test_an_exchange_deleted_while_forwarding_fails_the_attempt_with_why(
    own_settings: Settings, target: Target
) -> None:
    settings = own_settings.model_copy(update={"max_attempts": 1})
    async with (
        Forwarder(settings, target.exchange) as forwarder,
        running_worker(settings, "dest", forwarder, raw=True) as worker,
    ):
        await target.channel.exchange_delete(target.exchange)
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule("dest", "first", delay=0)
            await worker.wait_for(lambda s: s.parked >= 1)
            await target.channel.declare_exchange(target.exchange, aio_pika.ExchangeType.TOPIC)
            await target.bind("dest")
            await scheduler.schedule("dest", "second", delay=0)
            message = await target.next()
            [parked] = await ParkingLot(scheduler).peek()
    assert message.body == b'"second"', "the forwarder's channel came back"
    assert "does not exist" in parked.reason
