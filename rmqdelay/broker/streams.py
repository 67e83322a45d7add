"""Reading a stream once, to its end: the series registry, cancel-set snapshots, the
journal (for its keeper), and the ack discipline every such read on a shared connection
needs (``AckGate``).

A stream consumer is never told "that was the last record": the end is where a marker
appended now comes back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.connection import queue_starting
from rmqdelay.broker.publisher import properties
from rmqdelay.core.errors import BrokerUnavailableError, TopologyMismatchError
from rmqdelay.core.journal import STREAM_OFFSET
from rmqdelay.core.wire import MARKER

#: How long reading a stream to its end may take.
READ_TIMEOUT_S = 60.0
#: Records a ``ToTheEnd`` hands out between letting the event loop run others: the ones
#: read ahead are there already, and would otherwise all go without a pause.
YIELD_EVERY = 16
#: How long a read waits for the stream's replica on the node it reached to run again:
#: after the node leading a stream dies, the others restart theirs within seconds, and
#: until then a consumer is refused ("does not have a running replica on the local node").
REPLICA_WAIT_S = 30.0
REPLICA_RETRY_S = 0.5

T = TypeVar("T")


async def when_replica_runs(stream: str, read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, again while the broker refuses it only because its replica of
    ``stream`` is (re)starting, up to ``REPLICA_WAIT_S``.

    Raises:
        BrokerUnavailableError: the replica did not come back in time.
    """
    deadline = time.monotonic() + REPLICA_WAIT_S
    while True:
        try:
            return await read()
        except Exception as e:
            if not queue_starting(e):
                raise
            if time.monotonic() >= deadline:
                raise BrokerUnavailableError(
                    f"stream {stream!r} has had no running replica on the node this "
                    f"connection reaches for {REPLICA_WAIT_S:g}s (a node of the cluster is "
                    "down or restarting): try again, or connect to another node"
                ) from e
        await asyncio.sleep(REPLICA_RETRY_S)  # the replica gives no event to await


class AckGate:
    """The acks of one stream read, shut before its channel closes.

    A stream keeps delivering past the record a read waits for. An ack that leaves after
    the read's ``channel.close`` reaches a channel the broker already closed, and the broker
    answers with a connection error (504 "expected 'channel.open'") that takes down every
    channel of the connection: a scheduler's lookup would break its publishing. An ack in
    flight holds the gate, so ``close`` waits for it, and none starts after.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._shut = False

    async def ack(self, channel: aiormq.abc.AbstractChannel, tag: int | None) -> None:
        async with self._lock:
            if not self._shut and tag is not None and not channel.is_closed:
                await channel.basic_ack(tag, multiple=True)

    async def close(self, channel: AbstractChannel) -> None:
        async with self._lock:
            self._shut = True
        if not channel.is_closed:
            await channel.close()


class ToTheEnd:
    """The records of ``stream`` from ``offset`` to the end: where a marker appended on
    entering comes back. Iterate inside ``async with``; records are acked in batches, and
    leaving stops the acks before the channel closes. Others' markers are yielded too.

    Raises (while iterating):
        BrokerUnavailableError: no record came for ``timeout_s``.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        stream: str,
        offset: int | str | datetime,
        *,
        prefetch: int = 1000,
        ack_every: int = 500,
        timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._connection, self.stream, self._offset = connection, stream, offset
        self._prefetch, self._ack_every, self._timeout_s = prefetch, ack_every, timeout_s
        self._records: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        self._gate = AckGate()
        self._end = uuid.uuid4().hex
        self._seen = 0
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> ToTheEnd:
        await when_replica_runs(self.stream, self._open)
        return self

    async def _open(self) -> None:
        channel = self._channel = await self._connection.channel()
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=self._prefetch)

        async def on_record(message: DeliveredMessage) -> None:
            self._records.put_nowait(message)

        await raw.basic_consume(self.stream, on_record, arguments={"x-stream-offset": self._offset})
        await raw.basic_publish(
            b"", routing_key=self.stream, properties=properties({MARKER: self._end})
        )

    async def __aexit__(self, *_: object) -> None:
        if self._channel is not None:
            await self._gate.close(self._channel)

    def __aiter__(self) -> ToTheEnd:
        return self

    async def __anext__(self) -> DeliveredMessage:
        try:
            message = await asyncio.wait_for(self._records.get(), self._timeout_s)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"stream {self.stream!r} sent nothing for {self._timeout_s:g}s"
            ) from None
        self._seen += 1
        if self._seen % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # a worker's handlers share this loop
        if (message.header.properties.headers or {}).get(MARKER) == self._end:
            await self._gate.ack(message.channel, message.delivery_tag)
            raise StopAsyncIteration
        if self._seen % self._ack_every == 0:
            await self._gate.ack(message.channel, message.delivery_tag)
        return message


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
    return await when_replica_runs(
        stream, lambda: _read_stream(connection, stream, offset, prefetch, timeout_s)
    )


async def _read_stream(
    connection: AbstractConnection,
    stream: str,
    offset: str | datetime,
    prefetch: int,
    timeout_s: float,
) -> list[AbstractIncomingMessage]:
    channel, gate = await connection.channel(), AckGate()
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
            await gate.ack(message.channel, message.delivery_tag)

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
        await gate.close(channel)


async def read_at(
    connection: AbstractConnection, stream: str, offset: int, timeout_s: float = 10.0
) -> DeliveredMessage:
    """The record of ``stream`` at ``offset``, whole.

    Raises:
        BrokerUnavailableError: it could not be read in time (the retention dropped it, or
            the broker is slow to answer).
    """
    return await when_replica_runs(stream, lambda: _read_at(connection, stream, offset, timeout_s))


async def _read_at(
    connection: AbstractConnection, stream: str, offset: int, timeout_s: float
) -> DeliveredMessage:
    channel, gate = await connection.channel(), AckGate()
    try:
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=1)
        got: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()

        async def on_record(message: DeliveredMessage) -> None:
            headers = message.header.properties.headers or {}
            at = headers.get(STREAM_OFFSET)
            # A stream delivers from the start of the chunk holding ``offset``: skip (and
            # ack, one record is in flight at a time) what comes before it.
            if (isinstance(at, int) and at < offset) or MARKER in headers:
                await gate.ack(message.channel, message.delivery_tag)
            elif not got.done():
                got.set_result(message)

        await raw.basic_consume(stream, on_record, arguments={STREAM_OFFSET: offset})
        try:
            return await asyncio.wait_for(got, timeout_s)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"could not read record {offset} of stream {stream!r} within {timeout_s:g}s"
            ) from None
    finally:
        await gate.close(channel)


async def wait_first(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set (a follower waits for its link to drop or for
    its stop)."""
    waits = {asyncio.ensure_future(event.wait()) for event in events}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
