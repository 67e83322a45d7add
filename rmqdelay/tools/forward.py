"""The built-in handler that passes each task on to an exchange of the user's
(``rmqdelay consume DEST --forward EXCHANGE[:ROUTING_KEY]``, and ``rmqdelay bridge``).

Any AMQP consumer, in any language, then receives delayed messages without knowing
rmqdelay: the body and properties are the publisher's, rmqdelay's headers are gone.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity
from pamqp.commands import Basic

from rmqdelay.broker.connection import connect
from rmqdelay.broker.publisher import PERSISTENT, Publisher, reopened
from rmqdelay.core.errors import ConfigError, UnroutableError
from rmqdelay.core.relay import (
    forward_routing_key,
    forwarded_headers,
    restored_delivery_mode,
    restored_expiration,
)
from rmqdelay.core.task import Task
from rmqdelay.settings import Settings

MAX_NAME_BYTES = 255


def parse_target(text: str) -> tuple[str, str | None]:
    """``EXCHANGE[:ROUTING_KEY]`` split at the first colon.

    Raises:
        ConfigError: an empty or over-long exchange name, or an over-long routing key.
    """
    exchange, colon, routing_key = text.partition(":")
    if not exchange:
        raise ConfigError(
            f"--forward {text!r} names no exchange; give EXCHANGE or EXCHANGE:ROUTING_KEY"
        )
    for what, value in (("exchange name", exchange), ("routing key", routing_key)):
        if len(value.encode()) > MAX_NAME_BYTES:
            raise ConfigError(f"--forward {what} is over {MAX_NAME_BYTES} bytes: {value[:40]!r}…")
    return exchange, routing_key if colon else None


class Forwarder:
    """Publish each task's original message to ``exchange``, confirmed; a message the
    exchange routes nowhere, or that the broker refuses, fails the attempt (retried, then
    parked), so the worker acks a task only once the target has it.

    The routing key is ``routing_key`` if given, else the one a bridged message was
    published with, else the task's destination. Use as ``async with Forwarder(...) as f``
    and run a ``Worker(..., f, raw=True)``.
    """

    def __init__(self, settings: Settings, exchange: str, routing_key: str | None = None) -> None:
        self.settings = settings
        self.exchange = exchange
        self.routing_key = routing_key
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None

    async def __aenter__(self) -> Self:
        """Connect and check that the exchange exists.

        Raises:
            ConfigError: it does not.
        """
        self._connection = await connect(self.settings)
        try:
            await self._check_exchange()
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._publisher = Publisher(self.settings, channel)
        except BaseException:
            await self._connection.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._publisher = None

    async def _check_exchange(self) -> None:
        if self.exchange.startswith("amq.") or self._connection is None:
            return  # the broker's own exist everywhere (and refuse a passive declare by some)
        channel = await self._connection.channel()
        try:
            await channel.declare_exchange(self.exchange, passive=True)
        except ChannelNotFoundEntity:
            raise ConfigError(
                f"exchange {self.exchange!r} does not exist on {self.settings.safe_url}; "
                "declare it (and bind your consumers' queues to it) before forwarding to it"
            ) from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def __call__(self, task: Task) -> None:
        if self._publisher is None:
            raise RuntimeError("use the forwarder as 'async with Forwarder(...)'")
        routing_key = self.routing_key
        if routing_key is None:
            routing_key = forward_routing_key(task.headers, task.destination)
        what = f"task {task.id} forwarded to exchange {self.exchange!r}"
        try:
            await self._publisher.publish(
                task.body,
                self._properties(task),
                self.exchange,
                routing_key,
                mandatory=True,
                what=what,
            )
        except UnroutableError:
            raise UnroutableError(
                f"exchange {self.exchange!r} routed {task.id} (routing key {routing_key!r}) "
                "to no queue; bind a queue for that key to it",
                destination=task.destination,
            ) from None
        except ChannelNotFoundEntity:
            await reopened(self._publisher.channel)
            raise UnroutableError(
                f"exchange {self.exchange!r} does not exist (any more); declare it again",
                destination=task.destination,
            ) from None

    @staticmethod
    def _properties(task: Task) -> Basic.Properties:
        p, headers = task.properties, task.headers
        return Basic.Properties(
            content_type=task.content_type or None,
            content_encoding=p.get("content_encoding"),
            headers=forwarded_headers(headers),
            delivery_mode=restored_delivery_mode(headers) or p.get("delivery_mode", PERSISTENT),
            priority=p.get("priority"),
            correlation_id=p.get("correlation_id"),
            reply_to=p.get("reply_to"),
            expiration=restored_expiration(headers),
            message_id=p.get("message_id"),
            timestamp=p.get("timestamp"),
            message_type=p.get("message_type"),
            app_id=p.get("app_id"),
        )
