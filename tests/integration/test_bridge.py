"""``rmqdelay bridge``: publishers written for the delayed-message plugin, unchanged, and
plain consumers bound to the target exchange."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aio_pika
import pytest
from opentelemetry import trace

from rmqdelay import ConfigError, Scheduler, Settings
from rmqdelay.broker.declare import apply_topology, resolve_backend
from rmqdelay.cli.main import main
from rmqdelay.core.topology import build_topology
from rmqdelay.tools.bridge import Bridge, BridgePlan, drain, plan_bridge
from rmqdelay.tools.parking import ParkingLot

from .conftest import make_settings
from .helpers import in_background, use_in_cli
from .tracing import Spans, ids, spans, traceparent

__all__ = ["spans"]  # the fixture, imported for a test here

pytestmark = pytest.mark.integration


class Consumer:
    """A consumer that knows nothing of rmqdelay: a queue bound to the target exchange."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[aio_pika.abc.AbstractIncomingMessage, float]] = (
            asyncio.Queue()
        )

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await self.received.put((message, time.time()))

    async def next(self, within: float = 30) -> tuple[aio_pika.abc.AbstractIncomingMessage, float]:
        return await asyncio.wait_for(self.received.get(), within)


@pytest.fixture
async def channel(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


@pytest.fixture
def source() -> str:
    return f"legacy-delayed-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def plan(settings: Settings, source: str) -> AsyncIterator[BridgePlan]:
    plan = plan_bridge(settings, source, target_type="topic")
    yield plan
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        for exchange in (plan.source, plan.target):
            await channel.exchange_delete(exchange)
        for queue in (plan.intake, settings.wiring.names.work_queue(plan.destination)):
            await channel.queue_delete(queue)


async def _bind_consumer(
    channel: aio_pika.abc.AbstractChannel, exchange: str, routing_key: str
) -> Consumer:
    consumer = Consumer()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key)
    await queue.consume(consumer.on_message, no_ack=True)
    return consumer


async def _publish_as_plugin_user(
    channel: aio_pika.abc.AbstractChannel,
    exchange: str,
    routing_key: str,
    x_delay: object,
    **properties: object,
) -> float:
    """What a publisher written for the plugin sends: an x-delay header, nothing else."""
    headers = {"trace": "t-1"} if x_delay is None else {"x-delay": x_delay, "trace": "t-1"}
    target = await channel.get_exchange(exchange, ensure=False)
    sent = time.time()
    await target.publish(
        aio_pika.Message(b"payload bytes", headers=headers, **properties),  # type: ignore[arg-type]
        routing_key=routing_key,
    )
    return sent


@asynccontextmanager
async def running(settings: Settings, plan: BridgePlan) -> AsyncIterator[Bridge]:
    bridge = Bridge(settings, plan)
    await bridge.prepare()
    async with in_background(bridge.run, bridge.ready, "the bridge"):
        yield bridge


async def test_a_plugin_publisher_reaches_a_plain_consumer_on_time_as_it_sent(
    settings: Settings, plan: BridgePlan, channel: aio_pika.abc.AbstractChannel
) -> None:
    async with running(settings, plan):
        consumer = await _bind_consumer(channel, plan.target, "orders.*")
        sent = await _publish_as_plugin_user(
            channel,
            plan.source,
            "orders.eu",
            1200,
            content_type="application/xml",
            correlation_id="c-9",
            reply_to="answers",
            message_id="m-9",
            app_id="legacy",
            type="order.due",
            priority=4,
            expiration=60,  # seconds, in aio-pika: "60000" on the wire
            timestamp=datetime(2026, 11, 24, 9, tzinfo=UTC),
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        message, received = await consumer.next()
    assert received - sent >= 1.2, "never before its x-delay"
    assert received - sent < 1.2 + 5
    assert message.body == b"payload bytes"
    assert message.routing_key == "orders.eu"
    assert message.content_type == "application/xml"
    assert message.correlation_id == "c-9"
    assert message.reply_to == "answers"
    assert message.message_id == "m-9"
    assert message.app_id == "legacy"
    assert message.type == "order.due"
    assert message.priority == 4
    assert message.expiration == 60, "the per-message TTL comes back on the way out"
    assert message.timestamp == datetime(2026, 11, 24, 9, tzinfo=UTC)
    assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert message.headers == {"trace": "t-1", "x-delay": -1200}, "as the plugin hands it on"


async def test_a_plugin_publishers_trace_goes_on_through_the_bridge_and_the_delay(
    settings: Settings, plan: BridgePlan, channel: aio_pika.abc.AbstractChannel, spans: Spans
) -> None:
    publisher_span = trace.get_tracer("legacy shop").start_span("publish order")
    sent_traceparent = traceparent(publisher_span)  # type: ignore[arg-type]
    publisher_span.end()
    async with running(settings, plan):
        consumer = await _bind_consumer(channel, plan.target, "orders.*")
        target = await channel.get_exchange(plan.source, ensure=False)
        await target.publish(
            aio_pika.Message(b"o", headers={"x-delay": 300, "traceparent": sent_traceparent}),
            routing_key="orders.eu",
        )
        message, _ = await consumer.next()
    bridged = spans.one("bridge")
    assert bridged.parent is not None
    assert (f"{bridged.parent.trace_id:032x}", f"{bridged.parent.span_id:016x}") == ids(
        sent_traceparent
    ), "the publisher's trace goes on"
    execute = spans.one("execute")
    assert [link.context.span_id for link in execute.links] == [
        bridged.get_span_context().span_id  # type: ignore[union-attr]
    ]
    assert ids((message.headers or {})["traceparent"]) == ids(traceparent(bridged))


@pytest.mark.parametrize("x_delay", [None, 0, -50])
async def test_no_delay_goes_at_once(
    settings: Settings,
    plan: BridgePlan,
    channel: aio_pika.abc.AbstractChannel,
    x_delay: object,
) -> None:
    async with running(settings, plan):
        consumer = await _bind_consumer(channel, plan.target, "now")
        await _publish_as_plugin_user(channel, plan.source, "now", x_delay)
        message, _ = await consumer.next()
    assert message.body == b"payload bytes"
    assert "x-delay" not in (message.headers or {})


async def test_an_unreadable_x_delay_is_parked_with_why_and_requeue_delivers_it(
    settings: Settings, plan: BridgePlan, channel: aio_pika.abc.AbstractChannel
) -> None:
    async with running(settings, plan) as bridge, Scheduler(settings) as scheduler:
        consumer = await _bind_consumer(channel, plan.target, "odd")
        await _publish_as_plugin_user(channel, plan.source, "odd", "tomorrow", message_id="odd-1")
        async with asyncio.timeout(30):
            while bridge.parked < 1:  # noqa: ASYNC110 - the bridge offers no event for it
                await asyncio.sleep(0.02)
        lot = ParkingLot(scheduler)
        parked = [p for p in await lot.peek(1000) if p.id == "odd-1"]
        assert len(parked) == 1
        assert "x-delay is 'tomorrow'" in parked[0].reason
        assert await lot.requeue(["odd-1"]) == (1, [])
        message, _ = await consumer.next()
    assert message.routing_key == "odd"
    assert message.message_id == "odd-1"


async def test_messages_sent_while_no_bridge_runs_wait_and_then_arrive(
    settings: Settings, plan: BridgePlan, channel: aio_pika.abc.AbstractChannel
) -> None:
    await Bridge(settings, plan).prepare()  # declared, nobody consuming
    consumer = await _bind_consumer(channel, plan.target, "later")
    await _publish_as_plugin_user(channel, plan.source, "later", 300)
    async with running(settings, plan):
        message, _ = await consumer.next()
    assert message.headers == {"trace": "t-1", "x-delay": -300}


async def test_a_bridged_message_can_be_cancelled_by_its_message_id(
    settings: Settings, plan: BridgePlan, channel: aio_pika.abc.AbstractChannel
) -> None:
    async with running(settings, plan) as bridge, Scheduler(settings) as scheduler:
        consumer = await _bind_consumer(channel, plan.target, "k")
        await _publish_as_plugin_user(channel, plan.source, "k", 1500, message_id="order-41")
        async with asyncio.timeout(10):  # the cancel must come after the bridge took it
            while bridge.taken < 1:  # noqa: ASYNC110 - the bridge offers no event for it
                await asyncio.sleep(0.01)
        await scheduler.cancel("order-41")
        await _publish_as_plugin_user(channel, plan.source, "k", 1600, message_id="order-42")
        message, _ = await consumer.next()
    assert message.message_id == "order-42"
    assert consumer.received.empty()


async def test_an_exchange_that_is_neither_the_plugins_nor_a_bridge_is_refused(
    settings: Settings, plan: BridgePlan, channel: aio_pika.abc.AbstractChannel
) -> None:
    await channel.declare_exchange(plan.source, aio_pika.ExchangeType.DIRECT, durable=True)
    with pytest.raises(ConfigError, match="not a bridge"):
        await Bridge(settings, plan).prepare()


async def test_a_bridge_to_another_target_is_refused(settings: Settings, plan: BridgePlan) -> None:
    await Bridge(settings, plan).prepare()
    other = plan_bridge(settings, plan.source, target="elsewhere")
    with pytest.raises(ConfigError, match=f"pass --to {plan.target}"):
        await Bridge(settings, other).prepare()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": ""}, "give the name"),
        ({"source": "amq.direct"}, "amq"),
        ({"source": "x", "target": "x"}, "exchange of its own"),
        ({"source": "x", "target_type": "x-consistent-hash"}, "not one of"),
        ({"source": "x y"}, "--destination"),
    ],
)
def test_bad_names_are_refused_before_anything_is_declared(
    settings: Settings, kwargs: dict[str, str], match: str
) -> None:
    source = kwargs.pop("source")
    with pytest.raises(ConfigError, match=match):
        plan_bridge(settings, source, **kwargs)  # type: ignore[arg-type]


async def test_cli_declares_the_bridge(
    settings: Settings,
    plan: BridgePlan,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_in_cli(monkeypatch, settings)
    argv = ["bridge", "--from", plan.source, "--type", "topic", "--declare-only"]
    assert await asyncio.to_thread(main, argv) == 0
    assert f"bridge {plan.source!r}" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*argv[:3], "--drain"]) == 1
    assert "not the plugin's" in capsys.readouterr().err


async def test_a_bridge_on_a_namespace_nothing_has_declared_declares_it_and_delivers(
    broker_url: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    channel: aio_pika.abc.AbstractChannel,
) -> None:
    # The plugin guide's path (docs/how-to/plugin.md) for a broker that never had the
    # plugin: nothing of the namespace exists yet (its work exchange least of all, which
    # the bridge's work queue binds to).
    fresh = make_settings(broker_url, max_delay="1h")
    plan = plan_bridge(fresh, source, target_type="topic")
    use_in_cli(monkeypatch, fresh)
    try:
        argv = ["bridge", "--from", source, "--type", "topic", "--declare-only"]
        assert await asyncio.to_thread(main, argv) == 0
        assert f"bridge {source!r}" in capsys.readouterr().out
        consumer = await _bind_consumer(channel, plan.target, "orders.#")
        async with running(fresh, plan):
            sent = await _publish_as_plugin_user(channel, source, "orders.eu", 300)
            message, arrived = await consumer.next()
        assert message.body == b"payload bytes"
        assert arrived >= sent + 0.3, "never early"
    finally:
        await apply_topology(fresh, build_topology(fresh.layout, (plan.destination,)), delete=True)
        for exchange in (plan.source, plan.target):
            await channel.exchange_delete(exchange)
        await channel.queue_delete(plan.intake)


# --- where the broker has the plugin -------------------------------------------------------


async def _plugin_exchange(
    settings: Settings, channel: aio_pika.abc.AbstractChannel, name: str
) -> None:
    """A plugin exchange as its users declare it (skip where the broker has no plugin: an
    unknown exchange type closes the whole connection)."""
    if (await resolve_backend(settings.model_copy(update={"backend": "auto"}))).backend != "plugin":
        pytest.skip(
            "the broker has no x-delayed-message exchange type (rabbitmq_delayed_message_exchange "
            "is not enabled: Debian does not package it, and it cannot run on RabbitMQ 4.3)"
        )
    await channel.declare_exchange(
        name, "x-delayed-message", durable=True, arguments={"x-delayed-type": "topic"}
    )


async def test_switch_moves_the_plugins_bindings_to_the_target(
    settings: Settings, plan: BridgePlan
) -> None:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await _plugin_exchange(settings, channel, plan.source)
        queue = await channel.declare_queue(
            f"consumer-{plan.source}", durable=True, auto_delete=True
        )
        await queue.bind(plan.source, "orders.#")
        bridge = Bridge(settings, plan)
        with pytest.raises(ConfigError, match="migration guide"):
            await bridge.prepare()
        said = await bridge.prepare(switch=True)
        assert "1 binding(s) moved" in said
        consumer = Consumer()
        await queue.consume(consumer.on_message, no_ack=True)
        async with running(settings, plan):
            sent = await _publish_as_plugin_user(channel, plan.source, "orders.eu", 500)
            message, received = await consumer.next()
    assert received - sent >= 0.5
    assert message.routing_key == "orders.eu"


async def test_drain_waits_until_the_plugin_holds_nothing(
    settings: Settings, plan: BridgePlan
) -> None:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await _plugin_exchange(settings, channel, plan.source)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(plan.source, "#")
        await _publish_as_plugin_user(channel, plan.source, "a", 1500)
        assert await drain(settings, plan.source, timeout_s=0.1) == 1, "held, not drained"
        assert await drain(settings, plan.source, timeout_s=30, every_s=0.2) == 0
        await _publish_as_plugin_user(channel, plan.source, "a", 60_000)
        with pytest.raises(ConfigError, match="still holds"):
            await Bridge(settings, plan).prepare(switch=True)
        assert await queue.get(timeout=5), "the drained message reached its queue"


async def test_switch_on_this_broker_with_the_plugins_type_as_the_api_would_report_it(
    settings: Settings, plan: BridgePlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the plugin is missing, the switch still runs against the real broker: a real
    topic exchange with a real binding stands in for the plugin's, and only the management
    API's answer about it says what the plugin's would (its type, x-delayed-type, count)."""
    import rmqdelay.tools.bridge as bridge_module

    real = bridge_module.management_get
    held = {"count": 3}

    async def as_the_plugin_reports(settings: Settings, path: str, columns: str | None = None):  # type: ignore[no-untyped-def]
        answer = await real(settings, path, columns)
        if path.endswith(f"/{plan.source}") and answer is not None:
            answer |= {
                "type": "x-delayed-message",
                "arguments": {"x-delayed-type": "topic"},
                "messages_delayed": held["count"],
            }
        return answer

    monkeypatch.setattr(bridge_module, "management_get", as_the_plugin_reports)
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_exchange(plan.source, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            f"consumer-{plan.source}", durable=True, auto_delete=True
        )
        await queue.bind(plan.source, "orders.#")
        with pytest.raises(ConfigError, match="still holds 3 delayed messages"):
            await Bridge(settings, plan).prepare(switch=True)
        held["count"] = 0
        private = await channel.declare_queue(exclusive=True)
        await private.bind(plan.source, "private")
        with pytest.raises(ConfigError, match=f"queue {private.name!r}.*Nothing was switched"):
            await Bridge(settings, plan).prepare(switch=True)
        await private.unbind(plan.source, "private")
        said = await Bridge(settings, plan).prepare(switch=True)
        assert "1 binding(s) moved" in said
        monkeypatch.setattr(bridge_module, "management_get", real)
        consumer = Consumer()
        await queue.consume(consumer.on_message, no_ack=True)
        async with running(settings, plan):
            sent = await _publish_as_plugin_user(channel, plan.source, "orders.eu", 400)
            message, received = await consumer.next()
    assert received - sent >= 0.4
    assert message.routing_key == "orders.eu"
