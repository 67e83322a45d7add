"""Reading a stream once, to its end: the series registry, cancel-set snapshots.

A stream consumer is never told "that was the last record": the end is where a marker
appended now comes back.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.core.errors import BrokerUnavailableError, TopologyMismatchError
from rmqdelay.core.wire import MARKER

#: How long reading a stream to its end may take.
READ_TIMEOUT_S = 60.0


async def read_stream(
    connection: AbstractConnection,
    stream: str,
    *,
    offset: str | datetime = "first",
    prefetch: int = 1000,
    timeout_s: float = READ_TIMEOUT_S,
) -> list[AbstractIncomingMessage]:
    """Every record of ``stream`` from ``offset`` on, oldest first (markers left out).

    Raises:
        TopologyMismatchError: the stream does not exist.
        BrokerUnavailableError: it could not be read to its end in time.
    """
    channel = await connection.channel()
    try:
        try:
            queue = await channel.declare_queue(stream, passive=True)
        except ChannelNotFoundEntity:
            raise TopologyMismatchError(
                f"stream {stream!r} does not exist; declare the topology ('rmqdelay declare') "
                "or import definitions.json again"
            ) from None
        await channel.set_qos(prefetch_count=prefetch)
        marker, done = uuid.uuid4().hex, asyncio.Event()
        records: list[AbstractIncomingMessage] = []

        async def on_record(message: AbstractIncomingMessage) -> None:
            if (message.headers or {}).get(MARKER) == marker:
                done.set()
            elif MARKER not in (message.headers or {}):
                records.append(message)
            await message.ack()

        await queue.consume(on_record, arguments={"x-stream-offset": offset})
        await channel.default_exchange.publish(
            aio_pika.Message(b"", headers={MARKER: marker}), routing_key=stream
        )
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"could not read stream {stream!r} to its end within {timeout_s:g}s"
            ) from None
        return records
    finally:
        if not channel.is_closed:
            await channel.close()


async def wait_first(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set (a follower waits for its link to drop or for
    its stop)."""
    waits = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
