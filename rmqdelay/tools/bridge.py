"""``rmqdelay bridge``: a way off the delayed-message plugin without touching its publishers.

Publishers go on sending to exchange SOURCE with an ``x-delay`` header. SOURCE becomes a
fanout into the bridge's intake queue; the bridge schedules each message into the levels
(body, properties and routing key kept) for a destination of its own, and a forwarding
worker in the same process publishes it, when due, to exchange TARGET, where the
consumers' queues are bound (the plugin exchange's bindings move there on ``--switch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import AMQPError

from rmqdelay.broker import tracing
from rmqdelay.broker.connection import connect
from rmqdelay.broker.declare import check_topology, declare_topology, resolve_backend
from rmqdelay.broker.management import management_get, management_url, vhost_path
from rmqdelay.broker.publisher import Publisher, carried
from rmqdelay.broker.scheduler import new_task_id
from rmqdelay.core.cancelset import Stamps
from rmqdelay.core.errors import (
    ConfigError,
    InvalidDelayError,
    InvalidKeyError,
    RmqDelayError,
    TopologyMismatchError,
)
from rmqdelay.core.redact import Redactor
from rmqdelay.core.relay import bridged_headers, plugin_delay_ms
from rmqdelay.core.topology import (
    BRIDGE_ARGUMENT,
    TARGET_TYPES,
    ExchangeType,
    Topology,
    bridge_topology,
    build_topology,
)
from rmqdelay.core.wire import check_key, parked_headers, task_headers
from rmqdelay.settings import Settings
from rmqdelay.tools.forward import Forwarder
from rmqdelay.worker.consume import Worker
from rmqdelay.worker.stats import WorkerStats

log = logging.getLogger(__name__)

PLUGIN_TYPE = "x-delayed-message"
#: How long a message the bridge could not schedule waits before it goes back to the queue.
RETRY_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class BridgePlan:
    """The names one bridge works with."""

    source: str
    target: str
    target_type: ExchangeType
    destination: str
    intake: str


def plan_bridge(
    settings: Settings,
    source: str,
    *,
    target: str | None = None,
    target_type: str = "direct",
    destination: str | None = None,
) -> BridgePlan:
    """Check the names before anything is declared.

    Raises:
        ConfigError: naming the bad value.
    """
    if not source or source.startswith("amq.") or len(source.encode()) > 200:
        raise ConfigError(
            f"--from {source!r}: give the name of the exchange the publishers send to (not "
            "empty, not one of the broker's amq.* exchanges, at most 200 bytes)"
        )
    target = target or f"{source}.due"
    if target == source or target.startswith("amq."):
        raise ConfigError(f"--to {target!r} must be an exchange of its own, not {source!r}")
    if target_type not in TARGET_TYPES:
        raise ConfigError(
            f"--type {target_type!r} is not one of {', '.join(TARGET_TYPES)} (the types the "
            "plugin's x-delayed-type can name)"
        )
    names = settings.wiring.names
    if destination is None:
        destination = f"bridge.{source}"
    try:
        destination = names.check_destination(destination)
    except RmqDelayError as e:
        raise ConfigError(f"{e}; name the bridge's destination with --destination") from None
    return BridgePlan(
        source,
        target,
        target_type,
        destination,
        names.bridge_intake(source),
    )


class Bridge:
    """Schedules what publishers send to ``plan.source`` and forwards it to ``plan.target``."""

    def __init__(self, settings: Settings, plan: BridgePlan) -> None:
        self.settings = settings
        self.plan = plan
        self.topology: Topology = bridge_topology(
            settings.layout, plan.source, plan.target, plan.target_type, plan.destination
        )
        #: Messages taken from the intake queue, and how many of them were parked.
        self.taken = 0
        self.parked = 0
        self._stamps = Stamps()
        self._publisher: Publisher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set once both the intake and the forwarding worker consume.
        self.ready = asyncio.Event()

    async def prepare(self, *, switch: bool = False, force: bool = False) -> str:
        """Declare the bridge, taking the source over from the plugin when ``switch``.

        Returns what was done, for the operator.

        Raises:
            ConfigError: the source is the plugin's (without ``switch``), still holds
                delayed messages (without ``force``), or is some other exchange.
        """
        plan = self.plan
        info = await management_get(
            self.settings, f"exchanges/{vhost_path(self.settings)}/{quote(plan.source, safe='')}"
        )
        if info is not None and info.get("type") == PLUGIN_TYPE:
            if not switch:
                raise ConfigError(
                    f"exchange {plan.source!r} is the delayed-message plugin's; to move it "
                    "to rmqdelay follow the migration guide, docs/how-to/plugin.md (drain, "
                    "then run with --switch)"
                )
            return await self._switch(info, force=force)
        if info is not None and BRIDGE_ARGUMENT not in (info.get("arguments") or {}):
            raise ConfigError(
                f"exchange {plan.source!r} exists as a {info.get('type')} exchange that is "
                "not a bridge; rmqdelay replaces only the plugin's exchanges (--switch) or "
                "creates the exchange itself"
            )
        if info is not None and info["arguments"][BRIDGE_ARGUMENT] != plan.target:
            raise ConfigError(
                f"exchange {plan.source!r} already bridges to "
                f"{info['arguments'][BRIDGE_ARGUMENT]!r}, not {plan.target!r}; pass --to "
                f"{info['arguments'][BRIDGE_ARGUMENT]}"
            )
        await self._declare(self.topology)
        return (
            f"bridge {plan.source!r} -> levels -> {plan.target!r} ({plan.target_type}) is "
            "declared; bind your consumers' queues to the target"
        )

    async def _namespace(self, channel: AbstractChannel) -> None:
        """The namespace the bridge schedules into (levels, work exchange, parking lot),
        as any client declares it (or only checks it, with RMQDELAY_DECLARE=false): on a
        broker nothing else has set up yet, the bridge's own objects bind to it."""
        self.settings = await resolve_backend(self.settings)
        await check_topology(self.settings, build_topology(self.settings.layout), channel)

    async def _declare(self, topology: Topology) -> None:
        connection = await connect(self.settings)
        try:
            channel = await connection.channel()
            await self._namespace(channel)
            try:
                await declare_topology(channel, topology)
            except TopologyMismatchError as e:
                raise ConfigError(
                    f"exchange {self.plan.source!r} (or another bridge object) exists with "
                    f"other properties; is it the plugin's? Switching it needs the management "
                    f"API ({management_url(self.settings)}, set RMQDELAY_MANAGEMENT_URL). "
                    f"{e}"
                ) from None
        finally:
            await connection.close()

    async def _switch(self, info: dict[str, Any], *, force: bool) -> str:
        """Replace the plugin's exchange: its bindings go to the target, then the source is
        deleted and declared again as the bridge's fanout. Publishes in between (a few
        milliseconds) fail with 404 on the publisher's channel."""
        plan = self.plan
        held = info.get("messages_delayed")
        if held and not force:
            raise ConfigError(
                f"exchange {plan.source!r} still holds {held} delayed messages, which would "
                "be lost with it: stop its publishers and wait for 'rmqdelay bridge --drain' "
                "(or pass --force to lose them)"
            )
        delayed_type = (info.get("arguments") or {}).get("x-delayed-type", "direct")
        if delayed_type not in TARGET_TYPES:
            raise ConfigError(
                f"exchange {plan.source!r} routes as {delayed_type!r}; the bridge's target can "
                f"be {', '.join(TARGET_TYPES)}"
            )
        if delayed_type != plan.target_type:
            log.info("target %r takes the plugin's x-delayed-type %r", plan.target, delayed_type)
            self.plan = plan = BridgePlan(
                plan.source, plan.target, delayed_type, plan.destination, plan.intake
            )
            self.topology = bridge_topology(
                self.settings.layout, plan.source, plan.target, delayed_type, plan.destination
            )
        bindings = await management_get(
            self.settings,
            f"exchanges/{vhost_path(self.settings)}/{quote(plan.source, safe='')}/bindings/source",
        )
        if bindings is None:
            raise ConfigError(
                f"could not list the bindings of {plan.source!r} through the management API "
                f"({management_url(self.settings)})"
            )
        connection = await connect(self.settings)
        try:
            channel = await connection.channel()
            await self._namespace(channel)
            source, *rest = self.topology.exchanges
            without_source = Topology(tuple(rest), self.topology.queues, self.topology.bindings[1:])
            await declare_topology(channel, without_source)
            unmoved = await _copy_bindings(connection, bindings, plan.target)
            if unmoved and not force:
                raise ConfigError(
                    f"{len(unmoved)} binding(s) of {plan.source!r} cannot be moved to "
                    f"{plan.target!r}: {'; '.join(unmoved)}. Nothing was switched; have "
                    "their owners bind them to the target, or pass --force to switch "
                    "without them"
                )
            raw = await channel.get_underlay_channel()
            await raw.exchange_delete(plan.source)
            await declare_topology(channel, Topology((source,), (), self.topology.bindings[:1]))
        finally:
            await connection.close()
        moved = len(bindings) - len(unmoved)
        return (
            f"switched {plan.source!r} from the plugin to the bridge: {moved} binding(s) "
            f"moved to {plan.target!r} ({plan.target_type})"
            + (f"; NOT moved: {'; '.join(unmoved)}" if unmoved else "")
            + (f"; {held} delayed message(s) were lost with the plugin's exchange" if held else "")
        )

    async def run(self, stop: asyncio.Event) -> WorkerStats:
        """Take messages from the intake queue and forward due tasks until ``stop`` is set."""
        plan = self.plan
        connection = await connect(self.settings)
        try:
            async with Forwarder(self.settings, plan.target) as forwarder:
                worker = Worker(self.settings, plan.destination, forwarder, raw=True)
                working = asyncio.create_task(worker.run(stop))
                try:
                    await self._consume(connection, stop, worker, working)
                finally:
                    stop.set()
                    stats = await working
        finally:
            await connection.close()
        return stats

    async def _consume(
        self,
        connection: AbstractRobustConnection,
        stop: asyncio.Event,
        worker: Worker,
        working: asyncio.Task[WorkerStats],
    ) -> None:
        publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._publisher = Publisher(self.settings, publishing)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch_for(self.settings.concurrency))
        queue = await channel.get_queue(self.plan.intake, ensure=False)
        tag = await queue.consume(self._on_message)
        await _first(worker.ready.wait(), working)
        if working.done():
            return
        self.ready.set()
        log.info(
            "bridging %r -> %r via %s", self.plan.source, self.plan.target, self.plan.destination
        )
        await _first(stop.wait(), working)
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace.total_seconds())
        # Whatever did not finish is still unacked: closing the channel returns it.

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._take(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._schedule(message)
        except Exception as e:
            log.error(
                "could not schedule message %s from %r (%s); it goes back to the queue",
                message.message_id,
                self.plan.source,
                e,
            )
            await asyncio.sleep(RETRY_PAUSE_S)  # not a hot loop on a lasting failure
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        with contextlib.suppress(Exception):  # a dropped channel redelivers it: at least once
            await message.ack()
        self.taken += 1

    async def _schedule(self, message: AbstractIncomingMessage) -> None:
        assert self._publisher is not None
        plan, wiring = self.plan, self.settings.wiring
        props = message.properties
        task_id = _task_id(message.message_id)
        now_ms = time.time_ns() // 1_000_000
        try:
            delay_ms = plugin_delay_ms(message.headers)
            way = wiring.route(delay_ms * 1000, task_id)
        except InvalidDelayError as e:
            delay_ms, way = 0, wiring.route(0, task_id)
            problem: InvalidDelayError | None = e
        else:
            problem = None
        headers = bridged_headers(
            message.headers,
            routing_key=message.routing_key or "",
            expiration=props.expiration,
            delivery_mode=props.delivery_mode,
            delay_ms=delay_ms,
        )
        headers.update(
            task_headers(
                task_id,
                due_ms=now_ms + delay_ms,
                published_ms=self._stamps.publish(now_ms),
                route=way.headers,
            )
        )
        if problem is not None:
            # Parked as a task due now: once the operator has looked, 'parked requeue'
            # delivers it, as the plugin would have.
            await self._park(message, headers, problem)
            return
        # A trace the plugin's publisher began (its traceparent) goes on through the delay.
        with tracing.producing(
            "bridge", headers, parent_headers=message.headers,
            destination=plan.destination, task_id=task_id,
        ):  # fmt: skip
            await self._publisher.publish(
                message.body,
                carried(props, headers),
                way.exchange,
                plan.destination,
                mandatory=way.mandatory,
                what=f"the message {task_id} bridged from {plan.source!r}",
            )

    async def _park(
        self, message: AbstractIncomingMessage, headers: dict[str, Any], problem: Exception
    ) -> None:
        assert self._publisher is not None
        names = self.settings.wiring.names
        reason = Redactor(list(self.settings.secrets))(f"{type(problem).__name__}: {problem}")
        log.warning("parking message %s from %r: %s", message.message_id, self.plan.source, reason)
        parked = parked_headers(
            headers,
            reason=reason,
            error=type(problem).__name__,
            attempts=0,
            destination=self.plan.destination,
            now_ms=time.time_ns() // 1_000_000,
            source=self.plan.intake,
        )
        await self._publisher.publish(
            message.body,
            carried(message.properties, parked),
            names.parked,
            self.plan.destination,
            what=f"parking of {message.message_id}",
        )
        self.parked += 1


async def _copy_bindings(
    connection: AbstractRobustConnection, bindings: list[dict[str, Any]], target: str
) -> list[str]:
    """Bind to ``target`` what ``bindings`` bind; returns those the broker refused (an
    exclusive queue of another connection, one deleted meanwhile), each with why."""
    refused = []
    for b in bindings:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        bind = raw.queue_bind if b["destination_type"] == "queue" else raw.exchange_bind
        try:
            await bind(
                b["destination"], target, b["routing_key"], arguments=b.get("arguments") or {}
            )
        except AMQPError as e:
            refused.append(f"{b['destination_type']} {b['destination']!r} ({e})")
        finally:
            if not channel.is_closed:
                await channel.close()
    return refused


async def drain(settings: Settings, source: str, *, timeout_s: float, every_s: float = 1.0) -> int:
    """Wait until the plugin's exchange ``source`` holds no delayed messages; returns how
    many it still held when ``timeout_s`` ran out (0: drained).

    Raises:
        ConfigError: ``source`` is not a plugin exchange, or the broker does not say how
            many messages it holds.
    """
    path = f"exchanges/{vhost_path(settings)}/{quote(source, safe='')}"
    deadline = time.monotonic() + timeout_s
    while True:
        info = await management_get(settings, path)
        if info is None:
            raise ConfigError(
                f"exchange {source!r} was not found through the management API "
                f"({management_url(settings)})"
            )
        if info.get("type") != PLUGIN_TYPE:
            raise ConfigError(
                f"exchange {source!r} is a {info.get('type')} exchange, not the plugin's"
            )
        held = info.get("messages_delayed")
        if not isinstance(held, int):
            raise ConfigError(
                f"the broker does not report how many messages {source!r} holds "
                "(messages_delayed); wait for your longest x-delay to pass instead"
            )
        if held == 0 or time.monotonic() >= deadline:
            return held
        log.info("%r still holds %d delayed message(s)", source, held)
        await asyncio.sleep(every_s)


def _task_id(message_id: str | None) -> str:
    """The publisher's message id when it can be one (so ``rmqdelay cancel MESSAGE_ID``
    calls the message off), else a new one."""
    if message_id:
        with contextlib.suppress(InvalidKeyError):
            return check_key(message_id, "a task id")
    return new_task_id()


async def _first(event: Any, task: asyncio.Task[Any]) -> None:
    """Wait for ``event`` or for ``task`` to end (it raises then, if it failed)."""
    waiting = asyncio.ensure_future(event)
    try:
        await asyncio.wait({waiting, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if task.done():
        task.result()
