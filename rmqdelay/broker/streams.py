"""Reading a stream once, to its end: the series registry, and the cancel set for tools.

A stream consumer is never told "that was the last record": the end is where a marker
appended now comes back.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.cancels import CancelFollower
from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import BrokerUnavailableError, TopologyMismatchError
from rmqdelay.core.wire import MARKER
from rmqdelay.settings import Settings

#: How long reading a stream to its end may take.
READ_TIMEOUT_S = 60.0


async def read_stream(connection: AbstractRobustConnection, stream: str) -> list[bytes]:
    """Every record body of ``stream``, oldest first (markers left out).

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
        await channel.set_qos(prefetch_count=1000)
        marker, done, bodies = uuid.uuid4().hex, asyncio.Event(), []

        async def on_record(message: AbstractIncomingMessage) -> None:
            if (message.headers or {}).get(MARKER) == marker:
                done.set()
            elif MARKER not in (message.headers or {}):
                bodies.append(message.body)
            await message.ack()

        await queue.consume(on_record, arguments={"x-stream-offset": "first"})
        await channel.default_exchange.publish(
            aio_pika.Message(b"", headers={MARKER: marker}), routing_key=stream
        )
        try:
            await asyncio.wait_for(done.wait(), READ_TIMEOUT_S)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"could not read stream {stream!r} to its end within {READ_TIMEOUT_S:g}s"
            ) from None
        return bodies
    finally:
        if not channel.is_closed:
            await channel.close()


async def load_cancels(settings: Settings) -> CancelSet:
    """The cancel set as a worker starting now would have it (snapshot, then the rest).

    Raises:
        BrokerUnavailableError: it could not be loaded in time.
    """
    follower = CancelFollower(settings)
    stop = asyncio.Event()
    following = asyncio.create_task(follower.run(stop))
    caught_up = asyncio.create_task(follower.caught_up.wait())
    try:
        done, _ = await asyncio.wait(
            {following, caught_up}, timeout=READ_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if following in done:
            following.result()
        if caught_up not in done:
            raise BrokerUnavailableError(
                f"could not read the cancellation stream within {READ_TIMEOUT_S:g}s"
            )
        return follower.cancels
    finally:
        caught_up.cancel()
        stop.set()
        await following
