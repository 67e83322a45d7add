"""The logs beside the parking lot and the unroutable queue: how one message set aside is
found without taking the whole queue.

A queue cannot be read at a position: showing the newest of 10,000 parked messages
took 1.7 s, nearly all of it the client taking the 9,999 before it (about 9,000 a second
here, from a quorum or a classic queue alike). So each queue set aside has a stream
beside it, bound to the same fanout exchange: the broker copies every message that
reaches the queue into the stream, whoever sent it (a worker parking a task, the
broker dead-lettering one at a work queue's delivery limit, an alternate exchange).
rmqdelay's tools append a record to the stream for what they take out (requeue,
delete, purge). A long-running reader (``rmqdelay serve``) keeps, per id, the offsets
of the copies still in the queue, and reads one copy back at its offset.

The log is trusted only while it accounts for the queue exactly: when the copies it
holds do not number the messages ready in the queue (a consumer of your own took some,
one was parked before the log existed or outlived its retention, a look at the queue
holds some), the caller takes the queue as before, slower. One case slips through: a
consumer of your own takes a message in the instant another arrives in the queue but not
yet in the log; the counts then agree and the taken one is still shown, until the next
look (the log has the new copy by then).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping

from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPError

from rmqdelay.broker.streams import ToTheEnd, read_at
from rmqdelay.core.errors import RmqDelayError
from rmqdelay.core.journal import STREAM_OFFSET
from rmqdelay.core.wire import ASIDE_PURGED, ASIDE_TAKEN, MARKER, TASK_ID

log = logging.getLogger(__name__)


def message_id(headers: Mapping[str, object], fallback: str | None) -> str:
    """The id a message set aside is known by (its task id, else its message id)."""
    return str(headers.get(TASK_ID) or fallback or "-")


class AsideIndex:
    """Where the copies of the messages still set aside are in their log. No I/O."""

    def __init__(self) -> None:
        self._at: dict[str, list[int]] = {}
        #: Copies of messages still in the queue (a task parked twice counts twice).
        self.copies = 0
        #: Where the next read of the log starts.
        self.next_offset: int | str = "first"

    def logged(self, task_id: str, offset: int) -> None:
        """A copy of a message that reached the queue, at ``offset``."""
        self._at.setdefault(task_id, []).append(offset)
        self.copies += 1

    def taken(self, ids: Iterable[str]) -> None:
        """A tool took every message with these ids out of the queue."""
        for task_id in ids:
            self.copies -= len(self._at.pop(task_id, ()))

    def purged(self) -> None:
        """A tool purged the queue: what was logged before is gone."""
        self._at.clear()
        self.copies = 0

    def offset_of(self, task_id: str) -> int | None:
        """The oldest copy with this id still in the queue, if any."""
        offsets = self._at.get(task_id)
        return offsets[0] if offsets else None

    def read(self, headers: Mapping[str, object], body: bytes, fallback_id: str | None) -> None:
        """Apply one record of the log (markers are skipped)."""
        at = headers.get(STREAM_OFFSET)
        if isinstance(at, int):
            self.next_offset = at + 1
        if MARKER in headers:
            return
        if ASIDE_PURGED in headers:
            self.purged()
        elif ASIDE_TAKEN in headers:
            try:
                ids = json.loads(body)
            except ValueError:
                ids = None  # not ours: the copies no longer add up, and readers notice
            if isinstance(ids, list):
                self.taken(str(i) for i in ids)
        elif isinstance(at, int):
            self.logged(message_id(headers, fallback_id), at)


class AsideLog:
    """One queue's log, followed on demand: each lookup first reads what was appended
    since the last one (a few records, at the rate things are parked)."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.index = AsideIndex()
        self._lock = asyncio.Lock()
        self._missing_said = False

    async def catch_up(self, connection: AbstractConnection) -> bool:
        """Read the log to its end; False (said once) if it cannot be read."""
        async with self._lock:
            try:
                async with ToTheEnd(connection, self.stream, self.index.next_offset) as records:
                    async for record in records:
                        headers = record.header.properties.headers or {}
                        self.index.read(headers, record.body, record.header.properties.message_id)
            except (AMQPError, RmqDelayError) as e:
                if not self._missing_said:
                    log.warning(
                        "cannot read %s (%s): looking up a message set aside takes the "
                        "whole queue (declare the topology again to add the log)",
                        self.stream,
                        e,
                    )
                self._missing_said = True
                return False
        self._missing_said = False
        return True

    async def find(
        self, connection: AbstractConnection, task_id: str, ready: int
    ) -> DeliveredMessage | None:
        """The copy of the oldest message ``task_id`` in the queue, or None when the log
        cannot say: it is behind or off (its copies do not number the ``ready`` messages),
        or it does not know the id (then the queue may still hold it, from before the log)."""
        if not await self.catch_up(connection):
            return None
        offset = self.index.offset_of(task_id)
        if offset is None or self.index.copies != ready:
            return None
        try:
            return await read_at(connection, self.stream, offset)
        except (AMQPError, RmqDelayError) as e:
            log.warning("cannot read record %d of %s (%s)", offset, self.stream, e)
            return None
