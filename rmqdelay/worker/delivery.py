"""One delivered message, read straight from aiormq, and settled exactly once.

The worker consumes on aiormq's channel rather than through ``aio_pika.Queue.consume``:
aio-pika wraps every delivery in an ``IncomingMessage`` (thirteen properties copied
through a locking ``__setattr__``) and a second task. Measured side by side
(``bench/throughput.py``'s raw loop, same messages): 130 us of CPU per message against
170 us, about what the worker's own work per task costs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from rmqdelay.core.wire import PUBLISHER_PROPERTIES

log = logging.getLogger(__name__)


class Delivery:
    """What the worker reads of a delivery, and its ack or nack (the first one counts:
    a second would make the broker close the channel over an unknown delivery tag)."""

    __slots__ = (
        "_settled",
        "_tag",
        "arrived",
        "body",
        "channel",
        "content_type",
        "headers",
        "message_id",
        "overran",
        "properties",
        "ran",
        "redelivered",
        "routing_key",
        "stopped",
    )

    def __init__(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        #: All of them, for republishing the message as it came (a retry, the parking lot).
        self.properties: Basic.Properties = properties
        self.body: bytes = message.body
        self.headers: dict[str, Any] | None = properties.headers
        self.content_type: str | None = properties.content_type
        self.message_id: str | None = properties.message_id
        self.routing_key: str | None = message.routing_key
        self.redelivered = bool(message.redelivered)
        #: The channel it arrived on: acks go there, and only while it is open.
        self.channel: AbstractChannel = message.channel
        self._tag: int | None = message.delivery_tag
        self._settled = False
        #: When it arrived (time.monotonic()): the broker's consumer timeout counts from then.
        self.arrived = time.monotonic()
        #: Its handler was stopped near the broker's consumer timeout.
        self.stopped = False
        #: Its handler ran past the broker's consumer timeout: the broker took it back.
        self.overran = False
        #: Its key in the worker's RecentRuns once its handler was called.
        self.ran: int | None = None

    def publisher_properties(self) -> Mapping[str, Any]:
        """The properties the publisher set, other than headers and content type (what
        ``Task.properties`` holds): a view, read only if a handler looks."""
        return _PublisherProperties(self.properties)

    async def ack(self) -> None:
        """Done with it: the broker forgets it."""
        if (tag := self._settle()) is not None:
            await self.channel.basic_ack(tag)

    async def reject(self, requeue: bool = True) -> None:
        """Give it back (``requeue``), for this or another worker; every RabbitMQ version
        counts this toward a quorum queue's delivery limit (4.3 does not count a nack)."""
        if (tag := self._settle()) is not None:
            await self.channel.basic_reject(tag, requeue=requeue)

    def _settle(self) -> int | None:
        """The delivery tag to settle with, the first time only."""
        if self._settled or self._tag is None:
            log.debug("delivery %s is already settled", self.message_id)
            return None
        self._settled = True
        return self._tag


class _PublisherProperties(Mapping[str, Any]):
    """A delivery's publisher-set properties as a mapping of those not None, computed on
    first use: most handlers never look, and a dict per task would be paid on every one."""

    __slots__ = ("_properties", "_set")

    def __init__(self, properties: Basic.Properties) -> None:
        self._properties = properties
        self._set: dict[str, Any] | None = None

    def _values(self) -> dict[str, Any]:
        if self._set is None:
            p = self._properties
            values = ((name, getattr(p, name)) for name in PUBLISHER_PROPERTIES)
            self._set = {name: value for name, value in values if value is not None}
        return self._set

    def __getitem__(self, name: str) -> Any:
        return self._values()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())

    def __repr__(self) -> str:
        return repr(self._values())
