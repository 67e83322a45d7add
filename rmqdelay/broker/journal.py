"""Reading the journal stream into a ``TaskIndex``: what lookups, reschedules, exports and
transfers start from.

The journal is read from its start to a marker appended now (a stream has no "end" a
consumer is told of), with aiormq's consumer: records are decoded straight into index
entries, without aio-pika's message objects, and the index keeps one entry per task.
Nothing is taken from a queue: a stream is read, never consumed away.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.cancels import load_cancels
from rmqdelay.broker.publisher import properties
from rmqdelay.core.errors import (
    BrokerUnavailableError,
    JournalUnavailableError,
    MessageDecodeError,
)
from rmqdelay.core.journal import STREAM_OFFSET, TaskIndex, decode_entry
from rmqdelay.core.wire import MARKER, PUBLISHER_PROPERTIES
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

#: How long reading the journal to its end may take (about 15,000 records a second here).
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
    index = TaskIndex(cancels)
    stream = settings.names.journal
    channel = await connection.channel()
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
            tag = message.delivery_tag
            if (unacked >= ACK_EVERY or done.is_set()) and tag is not None:
                unacked = 0
                await message.channel.basic_ack(tag, multiple=True)

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
        if not channel.is_closed:
            await channel.close()
    log.debug(
        "read the journal: %d tasks in %.2fs (%d records were not tasks)",
        len(index), time.monotonic() - started, index.undecodable,
    )  # fmt: skip
    return index


def _add(index: TaskIndex, message: DeliveredMessage, headers: dict[str, Any]) -> None:
    props = message.header.properties
    offset = headers.get(STREAM_OFFSET)
    try:
        entry = decode_entry(
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
    except MessageDecodeError as e:
        index.undecodable += 1
        if index.undecodable == 1:
            log.warning("the journal holds a record that is not a task (%s); skipped", e)
        return
    index.add(entry)
