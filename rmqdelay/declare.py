"""Declaring (and for tests and teardown, deleting) a topology: walks the data, computes nothing."""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity, ChannelPreconditionFailed

from rmqdelay.errors import BrokerError, TopologyMismatchError
from rmqdelay.settings import Settings
from rmqdelay.topology import Topology


def _mismatch(kind: str, name: str, arguments: Any, error: Exception) -> BrokerError:
    if isinstance(error, ChannelAccessRefused):
        return BrokerError(f"not allowed to declare {kind} {name!r}: {error}")
    return TopologyMismatchError(
        f"{kind} {name!r} already exists with other properties than these settings expect "
        f"(expected arguments {arguments}); broker said: {error}. Use the settings it was "
        "created with (namespace, queue type, resolution, max delay), or delete it."
    )


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Declare every exchange, queue and binding of ``topology`` (idempotent).

    Raises:
        TopologyMismatchError: an object exists with other arguments. The broker closes the
            channel on this; open a new one to go on.
    """
    raw = await channel.get_underlay_channel()
    for x in topology.exchanges:
        try:
            await raw.exchange_declare(
                x.name, exchange_type=x.type, durable=True, arguments=dict(x.arguments)
            )
        except (ChannelPreconditionFailed, ChannelAccessRefused) as e:
            raise _mismatch("exchange", x.name, x.arguments, e) from e
    for q in topology.queues:
        try:
            await raw.queue_declare(q.name, durable=True, arguments=dict(q.arguments))
        except (ChannelPreconditionFailed, ChannelAccessRefused) as e:
            raise _mismatch("queue", q.name, q.arguments, e) from e
    for b in topology.bindings:
        if b.destination_type == "queue":
            await raw.queue_bind(
                b.destination, b.source, b.routing_key, arguments=dict(b.arguments)
            )
        else:
            await raw.exchange_bind(
                b.destination, b.source, b.routing_key, arguments=dict(b.arguments)
            )


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Delete every queue and exchange of ``topology``, messages included. Missing ones are fine."""
    raw: aiormq.abc.AbstractChannel = await channel.get_underlay_channel()
    for q in topology.queues:
        # if_unused must be off: quorum queues refuse it by closing the whole connection.
        await raw.queue_delete(q.name, if_unused=False, if_empty=False)
    for x in topology.exchanges:
        try:
            await raw.exchange_delete(x.name, if_unused=False)
        except ChannelNotFoundEntity:  # pragma: no cover - 3.x deletes missing exchanges fine
            raw = await channel.get_underlay_channel()


async def apply_topology(settings: Settings, topology: Topology, *, delete: bool = False) -> None:
    """Declare (or delete) ``topology`` over a connection of its own, closed afterwards."""
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        await (delete_topology if delete else declare_topology)(channel, topology)
