"""Keeping the journal: one worker of a fleet at a time writes again, at the journal's end,
the records of tasks that will still be pending when the retention drops the record.

Without it a task scheduled longer ago than the journal retention (a week by default,
against delays of up to ten years) could no longer be listed, rescheduled, exported or
transferred. ``core.journal.Keeping`` says when a pass reads and what it carries; this
module does the reading, the writing and the taking turns.

Turns: a keeper holds an exclusive queue (``Names.journal_keeper``). The broker gives it to
one connection and drops it with that connection, so when the keeping worker dies another
takes over. Progress: each pass appends a marker record naming the last offset it kept
through; a new keeper finds the newest such record near the journal's end and goes on
from there (from the start, if there is none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource
from pamqp.commands import Basic

from rmqdelay.broker.connection import CONNECTION_EXCEPTIONS, connect_once, reconnect_wait
from rmqdelay.broker.publisher import properties
from rmqdelay.broker.streams import ToTheEnd, wait_first
from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import BrokerUnavailableError, MessageDecodeError
from rmqdelay.core.journal import (
    STREAM_OFFSET,
    Keeping,
    TaskIndex,
    carried_headers,
    decode_entry,
    journaled_ms,
)
from rmqdelay.core.wire import KEPT_THROUGH, MARKER
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

#: Carried copies published before their confirms are awaited.
CONFIRM_WINDOW = 500
#: What ends a turn for a while (the next try starts from the progress record).
_INTERRUPTIONS: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, BrokerUnavailableError)


@dataclass(slots=True)
class Pass:
    """What one pass did."""

    read: int = 0
    carried: int = 0
    #: The offset kept through (None: the journal had nothing old enough yet).
    through: int | None = None


class JournalKeeper:
    """Keeps the journal of ``settings``' namespace whenever no one else does."""

    def __init__(self, settings: Settings, cancels: CancelSet) -> None:
        self.settings = settings
        self.keeping = Keeping(settings.wiring.layout.journal_retention_s * 1000)
        #: Only its ``is_pending`` is used: the cancel set as a worker has it.
        self._index = TaskIndex(cancels)
        #: Set while this keeper holds the turn.
        self.keeping_now = asyncio.Event()
        #: Set once the turn was refused (another keeper had it).
        self.refused = asyncio.Event()
        self._kept_through: int | None = None
        self._known = False

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: wait for the turn, then keep every ``Keeping.every_ms``."""
        every_s = self.keeping.every_ms / 1000
        lost_at: float | None = None
        # Not at once: a worker that lives a moment (a deploy, a test) costs nothing, and
        # nothing is late by a pass interval: records are carried a half retention early.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        while not stop.is_set():
            wait = every_s
            try:
                await self._take_turn(stop)
                lost_at = None
            except ChannelLockedResource:
                self.refused.set()  # another worker keeps; try again later
            except ChannelAccessRefused as e:
                log.warning(
                    "this worker may not declare %r (%s), so it never keeps the journal: "
                    "give the workers' user configure permission on it",
                    self.settings.names.journal_keeper, e,
                )  # fmt: skip
                return
            except _INTERRUPTIONS as e:
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("journal keeping interrupted (%s); trying again", e)
                wait = min(every_s, reconnect_wait(time.monotonic() - lost_at))
            except Exception:
                # Keeping must never stop a worker, nor fail unseen (the journal stream
                # deleted, a broker refusing something new): say it, try again a pass later.
                log.exception("journal keeping failed; trying again in %.0f s", every_s)
            finally:
                self.keeping_now.clear()
                self._known = False  # whoever kept meanwhile moved the progress on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _take_turn(self, stop: asyncio.Event) -> None:
        connection = await connect_once(self.settings, raw=True)
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        async with connection:
            lock = await connection.channel()
            raw = await lock.get_underlay_channel()
            await raw.queue_declare(self.settings.names.journal_keeper, exclusive=True)
            self.keeping_now.set()
            log.info("keeping the journal %s", self.settings.names.journal)
            while not stop.is_set() and not lost.is_set():
                await self.keep_once(connection)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait_first(stop, lost), self.keeping.every_ms / 1000)
            if lost.is_set() and not stop.is_set():
                raise ConnectionError("the journal keeper's connection was lost")

    async def keep_once(self, connection: AbstractConnection, now_ms: int | None = None) -> Pass:
        """One pass at ``now_ms`` (default: now): carry what must be, then record how far."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if not self._known:
            await self.resume(connection)
        done = await self._pass(connection, now_ms, self._kept_through)
        if done.through is not None and done.through != self._kept_through:
            await self._record_progress(connection, done.through)
            self._kept_through = done.through
        if done.carried:
            log.info(
                "journal kept through offset %s: %d records read, %d carried forward",
                done.through, done.read, done.carried,
            )  # fmt: skip
        return done

    async def resume(self, connection: AbstractConnection) -> int | None:
        """Find where the last keeper got to (done once per turn): the offset the newest
        progress record in the last few pass intervals names, None if there is none."""
        self._kept_through = await self._last_progress(connection)
        self._known = True
        return self._kept_through

    async def _pass(self, connection: AbstractConnection, now_ms: int, start: int | None) -> Pass:
        through_ms = self.keeping.through_ms(now_ms)
        done = Pass(through=start)
        publishing = await connection.channel(publisher_confirms=True)
        try:
            raw = await publishing.get_underlay_channel()
            confirms: list[asyncio.Future[Any]] = []
            offset = "first" if start is None else start + 1
            async with ToTheEnd(connection, self.settings.names.journal, offset) as records:
                async for message in records:
                    headers: dict[str, Any] = message.header.properties.headers or {}
                    if MARKER in headers:
                        continue  # not kept through: a quiet journal then needs no progress
                    written_ms = journaled_ms(headers)
                    if written_ms is not None and written_ms >= through_ms:
                        break  # this record, and the rest, are not old enough yet
                    done.read += 1
                    copy = self._carry(message, headers, written_ms, now_ms)
                    if copy is not None:
                        confirms.append(asyncio.ensure_future(raw.basic_publish(**copy)))
                        done.carried += 1
                        if len(confirms) >= CONFIRM_WINDOW:
                            await _confirmed(confirms)
                    if isinstance(at := headers.get(STREAM_OFFSET), int):
                        done.through = at
            await _confirmed(confirms)
        finally:
            await publishing.close()
        return done

    def _carry(
        self,
        message: DeliveredMessage,
        headers: dict[str, Any],
        written_ms: int | None,
        now_ms: int,
    ) -> dict[str, Any] | None:
        """The publish of ``message``'s carried copy, or None if it needs none."""
        if written_ms is None:
            return None  # not a task: nothing to keep
        props = message.header.properties
        try:
            entry = decode_entry(
                headers=headers,
                body=b"",
                routing_key=message.routing_key or "",
                content_type=None,
                properties={},
            )
        except MessageDecodeError:
            return None  # not a task: nothing to keep
        if not self.keeping.must_carry(entry.due_ms, written_ms):
            return None  # it is due before its record expires
        if not self._index.is_pending(entry, now_ms):
            return None
        props.headers = carried_headers(headers, entry.destination, now_ms)
        return {
            "body": message.body,
            "routing_key": self.settings.names.journal,
            "properties": props,
        }

    async def _last_progress(self, connection: AbstractConnection) -> int | None:
        """The offset the newest progress record near the journal's end names (by the
        stream's clock: when the broker wrote the records)."""
        since = datetime.fromtimestamp(time.time() - self.keeping.lookback_ms / 1000, UTC)
        newest: int | None = None
        async with ToTheEnd(connection, self.settings.names.journal, since) as records:
            async for message in records:
                kept = (message.header.properties.headers or {}).get(KEPT_THROUGH)
                if isinstance(kept, int) and (newest is None or kept > newest):
                    newest = kept
        return newest

    async def _record_progress(self, connection: AbstractConnection, through: int) -> None:
        channel = await connection.channel(publisher_confirms=True)
        try:
            raw = await channel.get_underlay_channel()
            marker = {MARKER: f"kept-{uuid.uuid4().hex}", KEPT_THROUGH: through}
            await raw.basic_publish(
                b"", routing_key=self.settings.names.journal, properties=properties(marker)
            )
        finally:
            await channel.close()


async def _confirmed(confirms: list[asyncio.Future[Any]]) -> None:
    """Wait for the broker to take every carried copy: progress is recorded only past
    copies it confirmed."""
    if confirms:
        answers = await asyncio.gather(*confirms)
        confirms.clear()
        if any(isinstance(answer, Basic.Nack) for answer in answers):
            raise BrokerUnavailableError("the broker refused to write a carried journal copy")
