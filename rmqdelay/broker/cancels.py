"""Following the cancellation stream: replay on start, follow live, resume after a drop.

A worker executes nothing while ``caught_up`` is clear. It is set only when a marker
record this follower appended has come back through the stream, so every cancel
confirmed before that moment is in the set: at start, and again after any reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.connection import (
    CONNECTION_EXCEPTIONS,
    connect_once,
    queue_starting,
    reconnect_wait,
)
from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import MessageDecodeError, TopologyMismatchError
from rmqdelay.core.wire import MARKER, decode_cancel
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

#: Stream records in flight to the follower; streams need a prefetch and acks.
STREAM_PREFETCH = 1000
#: How often cancels past the retention are forgotten.
EXPIRE_EVERY_S = 60.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class CancelFollower:
    """Keeps ``self.cancels`` in step with the broker's cancellation stream."""

    def __init__(
        self, settings: Settings, on_cancel: Callable[[str, int], None] | None = None
    ) -> None:
        self.settings = settings
        self.cancels = CancelSet(int(settings.retention.total_seconds() * 1000))
        #: Set while every cancel confirmed before the last (re)sync is known.
        self.caught_up = asyncio.Event()
        self._on_cancel = on_cancel
        #: Stream records received (cancels and markers), replays included.
        self.records_seen = 0
        self._offset: int | None = None
        self._marker: str | None = None
        self._channel: AbstractChannel | None = None
        self._connected = False

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream until ``stop`` is set, reconnecting after drops."""
        lost_at = time.monotonic()
        expiring = asyncio.create_task(self._expire_periodically())
        try:
            while not stop.is_set():
                try:
                    await self._follow(stop)
                except CONNECTION_EXCEPTIONS as e:
                    self.pause()
                    if self._connected:  # a new outage, not another failed attempt
                        lost_at, self._connected = time.monotonic(), False
                    wait = reconnect_wait(time.monotonic() - lost_at)
                    log.warning("cancellation stream lost (%s); reconnecting in %.1fs", e, wait)
                    await _sleep_or_stop(stop, wait)
        finally:
            expiring.cancel()
            self.pause()

    def pause(self) -> None:
        """Stop vouching for the set until a new marker comes back (a connection dropped)."""
        self.caught_up.clear()
        self._marker = None

    async def resync(self) -> None:
        """Append a marker and clear ``caught_up`` until it comes back through the stream."""
        self.pause()
        channel = self._channel
        if channel is None or channel.is_closed:
            return  # _follow appends one when it reconnects
        marker = uuid.uuid4().hex
        self._marker = marker
        message = aio_pika.Message(b"", headers={MARKER: marker}, delivery_mode=2)
        await channel.default_exchange.publish(message, routing_key=self.settings.names.cancels)

    async def _follow(self, stop: asyncio.Event) -> None:
        # A plain connection: aio-pika's robust one would re-consume from the original
        # x-stream-offset after a reconnect, replaying everything; we resume ourselves.
        connection = await connect_once(self.settings)
        # closed() only resolves on a close we asked for; a dropped link fires the callbacks.
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=STREAM_PREFETCH)
            stream = await channel.get_queue(self.settings.names.cancels, ensure=False)
            # Resume after the last record seen: a reconnect must not replay from the start
            # (nor skip what came in while we were away).
            offset: int | str = "first" if self._offset is None else self._offset + 1
            try:
                await stream.consume(self._on_record, arguments={"x-stream-offset": offset})
            except ChannelNotFoundEntity as e:
                if queue_starting(e):  # right after a broker restart: try again shortly
                    raise ConnectionError(f"cancellation stream not available yet: {e}") from e
                raise TopologyMismatchError(
                    f"cancellation stream {stream.name!r} does not exist; declare the topology "
                    "('rmqdelay declare') or set RMQDELAY_DECLARE=true"
                ) from e
            # A consumer the broker cancels (the stream was deleted) looks like a lost link:
            # reconnecting finds the stream gone and says so, instead of following nothing.
            raw = await channel.get_underlay_channel()
            raw.on_consumer_cancel_callbacks.add(lambda *_: lost.set())
            self._channel, self._connected = channel, True
            try:
                await self.resync()
                waits = {asyncio.ensure_future(lost.wait()), asyncio.ensure_future(stop.wait())}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
            finally:
                self._channel = None
            if lost.is_set() and not stop.is_set():
                raise ConnectionError("connection to the cancellation stream was lost")

    async def _on_record(self, message: AbstractIncomingMessage) -> None:
        self.records_seen += 1
        headers = message.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._offset = offset
        marker = headers.get(MARKER)
        if marker is not None:
            if marker == self._marker:
                log.info("cancellation set caught up: %d keys", len(self.cancels))
                self.caught_up.set()
        else:
            self._add(headers)
        await message.ack()

    def _add(self, headers: Mapping[str, Any]) -> None:
        try:
            key, at_ms = decode_cancel(headers)
        except MessageDecodeError as e:
            log.warning("ignoring a malformed cancel record: %s", e)
            return
        if self.cancels.add(key, at_ms, _now_ms()) and self._on_cancel is not None:
            self._on_cancel(key, at_ms)

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            if forgotten := self.cancels.expire(_now_ms()):
                log.info("forgot %d cancels past the retention", forgotten)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
