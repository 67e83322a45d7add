"""The worker's consumer on its work queue: subscribed on aiormq's channel, heard when the
broker cancels it, restored after a reconnect, and the queue declared again when it was
deleted under the worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
)
from pamqp.commands import Basic

from rmqdelay.broker.connection import RECONNECT_FIRST_S, queue_starting
from rmqdelay.broker.declare import declare_topology
from rmqdelay.core.errors import ConsumerCancelledError, RmqDelayError, TopologyMismatchError
from rmqdelay.core.topology import destination_topology
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

OnDelivery = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]
#: Consumes in a row the broker may refuse (the queue gone again each time it was declared)
#: before the worker stops: each follows a declare that waits up to RMQDELAY_CONNECT_TIMEOUT.
MAX_REFUSED_CONSUMES = 5


class Subscription:
    """One destination's consumer. aiormq's channel rather than aio-pika's consume:
    see ``worker/delivery.py``."""

    def __init__(self, settings: Settings, destination: str, on_delivery: OnDelivery) -> None:
        self._settings = settings
        self._destination = destination
        self._on_delivery = on_delivery
        self.name = settings.wiring.names.work_queue(destination)
        #: The broker's consumer timeout, set to what the worker plans by, on a quorum work
        #: queue (RabbitMQ 3.12+; 3.10 ignores the argument and applies its own
        #: consumer_timeout). 4.3 refuses it on a classic queue, where it applies none.
        self._arguments: dict[str, Any] = (
            {"x-consumer-timeout": int(settings.consumer_timeout.total_seconds() * 1000)}
            if settings.queue_type == "quorum"
            else {}
        )
        #: Set when the broker cancels the consumer (its queue was deleted).
        self.lost = asyncio.Event()
        self._tag: str | None = None
        #: Consumes refused in a row (see ``consume``).
        self._refusals = 0

    async def check(self, connection: AbstractRobustConnection) -> None:
        """Make sure the work queue exists (passively: naming it when it does not).

        On a throwaway channel: a queue declared on the consuming (robust) channel would be
        declared again by aio-pika at every reconnect, and a queue deleted meanwhile would
        then fail the reconnect itself, forever.

        Raises:
            TopologyMismatchError: no work queue, and the worker may not declare it.
        """
        try:
            async with connection.channel() as probe:
                await probe.declare_queue(self.name, passive=True)
        except ChannelNotFoundEntity as e:
            raise TopologyMismatchError(
                f"work queue {self.name!r} for destination {self._destination!r} does not "
                "exist and RMQDELAY_DECLARE is false: declare it ('rmqdelay declare "
                f"{self._destination}') or let the worker declare (RMQDELAY_DECLARE=true)"
            ) from e

    async def watch(self, channel: AbstractChannel) -> None:
        """Hear of the broker cancelling the consumer, and consume again on the channel
        aio-pika reopens after a reconnect (it restores only consumers it made itself)."""

        async def listen() -> None:
            raw = await channel.get_underlay_channel()
            raw.on_consumer_cancel_callbacks.add(self._on_cancel)

        async def reopened(*_: object) -> None:
            await listen()
            if self._tag is None:
                return
            try:
                await self.start(channel)
            except AMQPError as e:
                # The queue went while we were away, say: treated as the broker cancelling
                # the consumer (declare it again, or stop and say why), not left silent.
                log.warning("could not consume %s again after reconnecting: %s", self.name, e)
                self._tag = None
                self.lost.set()

        await listen()
        channel.reopen_callbacks.add(reopened)  # type: ignore[attr-defined]

    async def consume(self, channel: AbstractChannel) -> bool:
        """Start consuming on ``channel``; False (and ``lost`` set) when the broker refused
        because the queue is gone: a deletion races the check before a consume (RabbitMQ
        4.3 cancels consumers before the queue leaves its metadata, so a passive declare
        may still find it), and the caller handles that as it handles a cancel.

        Raises:
            ConsumerCancelledError: the consume kept failing so (the queue comes and goes,
                or the connection fails every time) as long as a first connect would wait.
        """
        try:
            await self.start(channel)
        except (ChannelNotFoundEntity, AMQPConnectionError, ChannelInvalidStateError) as e:
            log.warning("could not consume %s: %s", self.name, e)
            self._refusals += 1
            if self._refusals > MAX_REFUSED_CONSUMES:
                raise self._cancelled_for_good(e) from e
            self._tag = None
            self.lost.set()
            return False
        self._refusals = 0
        return True

    async def start(self, channel: AbstractChannel) -> None:
        """Consume (again) on ``channel``.

        A consume the broker refused while aio-pika restored the channel (the queue was
        deleted meanwhile) leaves the channel closed for good: aio-pika does not restore a
        channel that closes during its own restore. Reopen it then.
        """
        self.lost.clear()
        arguments = self._arguments
        try:
            raw = await channel.get_underlay_channel()
            ok = await raw.basic_consume(self.name, self._on_delivery, arguments=arguments)
        except ChannelInvalidStateError:
            await channel.reopen()
            raw = await channel.get_underlay_channel()
            ok = await raw.basic_consume(self.name, self._on_delivery, arguments=arguments)
        self._tag = ok.consumer_tag

    async def stop(self, channel: AbstractChannel) -> None:
        """Stop consuming; nothing is restored after this."""
        tag, self._tag = self._tag, None
        if tag is not None and not channel.is_closed:
            raw = await channel.get_underlay_channel()
            await raw.basic_cancel(tag)

    def _on_cancel(self, frame: Basic.Cancel) -> None:
        if frame.consumer_tag == self._tag:
            self._tag = None  # the broker has dropped it already
            self.lost.set()

    async def declare_again(self, connection: AbstractRobustConnection) -> None:
        """After a broker-side cancel: declare the work queue again (or, without declaring
        rights, wait for it), as long as a first connect would wait.

        Raises:
            ConsumerCancelledError: it could not be declared again.
        """
        give_up = time.monotonic() + self._settings.connect_timeout.total_seconds()
        while True:
            try:
                # A consume refused with "noproc" closes the whole connection: declare
                # once aio-pika has it back.
                async with asyncio.timeout(max(0.0, give_up - time.monotonic())):
                    await connection.connected.wait()
                await self._declare_on_a_probe(connection)
                break
            except TimeoutError as e:
                raise self._cancelled_for_good(e) from e
            except (AMQPError, RuntimeError) as e:
                if not (self._transient(e) and time.monotonic() < give_up):
                    raise self._cancelled_for_good(e) from e
            except RmqDelayError as e:
                raise self._cancelled_for_good(e) from e
            await asyncio.sleep(RECONNECT_FIRST_S)  # retry backoff, not synchronisation
        log.info("work queue %s is back", self.name)

    def _transient(self, error: BaseException) -> bool:
        """Whether declaring may work if tried again: the queue's node is still starting,
        the connection is being restored (aio-pika says RuntimeError), or - for a worker
        that declares - the queue was still being deleted (RabbitMQ 4.3 cancels its
        consumers first: a declare then meets the queue, and the next step NOT_FOUND)."""
        if queue_starting(error):
            return True
        if isinstance(error, AMQPConnectionError | ChannelInvalidStateError | RuntimeError):
            return True
        return self._settings.declare and isinstance(error, ChannelNotFoundEntity)

    async def _declare_on_a_probe(self, connection: AbstractRobustConnection) -> None:
        """Declare (or check) the work queue on a channel of its own: a failed declare
        closes its channel, which must not be the consuming one."""
        async with connection.channel() as probe:
            if self._settings.declare:
                layout = self._settings.wiring.layout
                await declare_topology(probe, destination_topology(layout, self._destination))
            else:
                await probe.declare_queue(self.name, passive=True)

    def _cancelled_for_good(self, e: BaseException) -> ConsumerCancelledError:
        advice = (
            f"declare it ('rmqdelay declare {self._destination}') and restart the worker"
            if not self._settings.declare
            else "check the worker's permissions and the namespace's exchanges"
        )
        return ConsumerCancelledError(
            f"work queue {self.name!r} was deleted under the worker (the broker cancelled "
            f"its consumer) and could not be declared again ({type(e).__name__}: {e}); "
            f"{advice}"
        )
