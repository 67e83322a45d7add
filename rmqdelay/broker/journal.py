"""Reading the journal stream into a ``TaskIndex``: what lookups, reschedules, exports and
transfers start from.

The journal is read from its start to a marker appended now (a stream has no "end" a
consumer is told of), with aiormq's consumer: records are decoded straight into index
entries, without aio-pika's message objects, and the index keeps one entry per task.
Nothing is taken from a queue: a stream is read, never consumed away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.cancels import CancelFollower, load_cancels
from rmqdelay.broker.connection import (
    CONNECTION_EXCEPTIONS,
    connect_once,
    queue_starting,
    reconnect_wait,
)
from rmqdelay.broker.publisher import properties
from rmqdelay.broker.streams import AckGate, read_at, wait_first, when_replica_runs
from rmqdelay.core.errors import (
    BrokerUnavailableError,
    JournalUnavailableError,
    MessageDecodeError,
)
from rmqdelay.core.journal import STREAM_OFFSET, Entry, TaskIndex, decode_entry
from rmqdelay.core.wire import MARKER, PUBLISHER_PROPERTIES
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

#: How long reading the journal to its end may take (about 7,000 records a second here).
JOURNAL_READ_TIMEOUT_S = 600.0
#: Records in flight; stream acks only return credit, so they are sent in batches.
PREFETCH = 2000
ACK_EVERY = PREFETCH // 4


def require_journal(settings: Settings) -> None:
    """Raise JournalUnavailableError, saying why, unless these settings keep a journal."""
    if settings.delay_backend == "plugin":
        raise JournalUnavailableError(
            "the delayed-message plugin holds the tasks, and it cannot be read: lookups, "
            "reschedules and exports need RMQDELAY_BACKEND=levels"
        )
    if not settings.journal:
        raise JournalUnavailableError(
            "RMQDELAY_JOURNAL is false, so tasks are not copied to the journal and cannot "
            "be looked up; turn it on (tasks scheduled from then on can be)"
        )


async def read_journal(
    settings: Settings,
    connection: AbstractConnection,
    *,
    timeout_s: float = JOURNAL_READ_TIMEOUT_S,
) -> TaskIndex:
    """The journal to its current end, with the cancel set a worker would have now.

    Raises:
        JournalUnavailableError: no journal (turned off, the plugin, the stream missing).
        BrokerUnavailableError: it could not be read to its end in time.
    """
    require_journal(settings)
    started = time.monotonic()
    cancels = await load_cancels(settings)
    index = await when_replica_runs(
        settings.names.journal,
        lambda: _read_to_the_end(settings, connection, TaskIndex(cancels), timeout_s),
    )
    log.debug(
        "read the journal: %d tasks in %.2fs (%d records were not tasks)",
        len(index), time.monotonic() - started, index.undecodable,
    )  # fmt: skip
    return index


async def _read_to_the_end(
    settings: Settings, connection: AbstractConnection, index: TaskIndex, timeout_s: float
) -> TaskIndex:
    stream = settings.names.journal
    channel, gate = await connection.channel(), AckGate()
    try:
        raw = await channel.get_underlay_channel()
        try:
            await raw.queue_declare(stream, passive=True)
        except ChannelNotFoundEntity:
            raise JournalUnavailableError(
                f"the journal stream {stream!r} does not exist: declare the topology again "
                "('rmqdelay declare', or import definitions.json); tasks scheduled from then "
                "on can be looked up"
            ) from None
        await raw.basic_qos(prefetch_count=PREFETCH)
        marker, done = uuid.uuid4().hex, asyncio.Event()
        unacked = 0

        async def on_record(message: DeliveredMessage) -> None:
            nonlocal unacked
            props = message.header.properties
            headers: dict[str, Any] = props.headers or {}
            if headers.get(MARKER) == marker:
                done.set()
            elif MARKER not in headers:
                _add(index, message, headers)
            unacked += 1
            if unacked >= ACK_EVERY or done.is_set():
                unacked = 0
                await gate.ack(message.channel, message.delivery_tag)

        await raw.basic_consume(stream, on_record, arguments={"x-stream-offset": "first"})
        await raw.basic_publish(b"", routing_key=stream, properties=properties({MARKER: marker}))
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"could not read the journal {stream!r} to its end within {timeout_s:g}s "
                f"({len(index)} tasks read)"
            ) from None
    finally:
        await gate.close(channel)
    return index


def _decode(message: DeliveredMessage, headers: dict[str, Any]) -> Entry:
    props = message.header.properties
    offset = headers.get(STREAM_OFFSET)
    return decode_entry(
        headers=headers,
        body=message.body,
        routing_key=message.routing_key or "",
        content_type=props.content_type,
        properties={
            name: value
            for name in PUBLISHER_PROPERTIES
            if (value := getattr(props, name)) is not None
        },
        offset=offset if isinstance(offset, int) else 0,
    )


def _add(
    index: TaskIndex, message: DeliveredMessage, headers: dict[str, Any], *, slim: bool = False
) -> None:
    try:
        entry = _decode(message, headers)
    except MessageDecodeError as e:
        index.undecodable += 1
        if index.undecodable == 1:
            log.warning("the journal holds a record that is not a task (%s); skipped", e)
        return
    index.add(entry.slim() if slim else entry)


#: How long reading one record back by its offset may take.
READ_RECORD_TIMEOUT_S = 10.0


async def read_record(settings: Settings, connection: AbstractConnection, offset: int) -> Entry:
    """The journal's record at ``offset``, whole (a live index keeps entries without
    their bodies).

    Raises:
        BrokerUnavailableError: it could not be read in time (the retention dropped it).
    """
    message = await read_at(connection, settings.names.journal, offset, READ_RECORD_TIMEOUT_S)
    return _decode(message, message.header.properties.headers or {})


#: A live index forgets tasks this long past due (retries and reschedules of them come
#: back as new copies), so its memory is the pending tasks plus an hour.
KEEP_PAST_DUE_S = 3600.0
PRUNE_EVERY_S = 60.0
#: How long a lookup waits for the live index to catch up before it says so.
SYNC_TIMEOUT_S = 30.0


class LiveJournal:
    """Follows the journal, and the cancellation stream, to keep a ``TaskIndex`` current:
    for a long-running process (``rmqdelay serve``) whose lookups must not read the whole
    journal each time. Entries are kept slim (no body); ``whole()`` reads one back.

    A lookup first appends a marker to each stream and waits for both to come back
    (``synced``), so it sees every task and cancel confirmed before it began.
    """

    def __init__(self, settings: Settings) -> None:
        require_journal(settings)
        self.settings = settings
        self.follower = CancelFollower(settings, quiet=True)
        self.index = TaskIndex(self.follower.cancels)
        self.caught_up = asyncio.Event()
        self._offset: int | None = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._channel: Any = None
        self._sync = asyncio.Lock()
        #: Whether the stream was followed since the last drop (an outage starts anew).
        self._followed = False

    async def run(self, stop: asyncio.Event) -> None:
        """Follow both streams until ``stop`` is set, reconnecting after drops."""
        cancels = asyncio.create_task(self.follower.run(stop))
        pruning = asyncio.create_task(self._prune_periodically())
        lost_at: float | None = None
        try:
            while not stop.is_set():
                try:
                    await self._follow(stop)
                except Exception as e:
                    # A replica restarting after a node loss refuses consumers for a while.
                    if not isinstance(e, CONNECTION_EXCEPTIONS) and not queue_starting(e):
                        raise
                    self.caught_up.clear()
                    if lost_at is None or self._followed:  # a new outage: say it once
                        lost_at, self._followed = time.monotonic(), False
                        log.warning("journal stream lost (%s); reconnecting", e)
                    wait = reconnect_wait(time.monotonic() - lost_at)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
        finally:
            pruning.cancel()
            await cancels

    async def _follow(self, stop: asyncio.Event) -> None:
        connection = await connect_once(self.settings, raw=True)
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            raw = await channel.get_underlay_channel()
            await raw.basic_qos(prefetch_count=PREFETCH)
            offset: int | str = "first" if self._offset is None else self._offset + 1
            unacked = 0

            async def on_record(message: DeliveredMessage) -> None:
                nonlocal unacked
                headers: dict[str, Any] = message.header.properties.headers or {}
                marker = headers.get(MARKER)
                if isinstance(at := headers.get(STREAM_OFFSET), int):
                    self._offset = at
                if marker is None:
                    _add(self.index, message, headers, slim=True)
                elif (waiter := self._waiting.pop(marker, None)) is not None:
                    waiter.set_result(None)
                unacked += 1
                tag = message.delivery_tag
                if (unacked >= ACK_EVERY or marker is not None) and tag is not None:
                    unacked = 0
                    await message.channel.basic_ack(tag, multiple=True)

            await raw.basic_consume(
                self.settings.names.journal, on_record, arguments={"x-stream-offset": offset}
            )
            raw.on_consumer_cancel_callbacks.add(lambda *_: lost.set())
            self._channel = channel
            try:
                await self._marker()
                self.caught_up.set()
                self._followed = True
                log.info("journal followed: %d tasks", len(self.index))
                await wait_first(lost, stop)
            finally:
                self._channel = None
                for waiter in self._waiting.values():
                    waiter.set_exception(ConnectionError("the journal stream was lost"))
                self._waiting.clear()
            if lost.is_set() and not stop.is_set():
                raise ConnectionError("connection to the journal stream was lost")

    async def _marker(self) -> None:
        """Append a marker to the journal and wait until this follower has read it."""
        channel = self._channel
        if channel is None or channel.is_closed:
            raise ConnectionError("not following the journal")
        marker = uuid.uuid4().hex
        waiter = self._waiting[marker] = asyncio.get_running_loop().create_future()
        raw = await channel.get_underlay_channel()
        await raw.basic_publish(
            b"", routing_key=self.settings.names.journal, properties=properties({MARKER: marker})
        )
        await waiter

    async def loaded(self) -> None:
        """Return once the journal and the cancels have been read up to now once."""
        await self.caught_up.wait()
        await self.follower.caught_up.wait()

    async def synced(self) -> TaskIndex:
        """The index, once it holds every task and cancel confirmed before this call.

        Raises:
            BrokerUnavailableError: the streams could not be followed in time.
        """
        try:
            async with asyncio.timeout(SYNC_TIMEOUT_S), self._sync:
                await self.caught_up.wait()
                await self._marker()
                await self.follower.resync()
                await self.follower.caught_up.wait()
        except (TimeoutError, ConnectionError):
            if not self.caught_up.is_set():
                raise BrokerUnavailableError(
                    f"the journal is still being read ({len(self.index)} tasks so far, about "
                    "7,000 records a second); ask again shortly"
                ) from None
            raise BrokerUnavailableError(
                f"the journal index is not following the broker (within {SYNC_TIMEOUT_S:g}s)"
            ) from None
        return self.index

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            now_ms = time.time_ns() // 1_000_000
            if gone := self.index.prune(now_ms - int(KEEP_PAST_DUE_S * 1000)):
                log.debug("forgot %d tasks long past due", gone)
