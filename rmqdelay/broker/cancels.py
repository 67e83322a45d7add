"""Following the cancellation stream: load a snapshot and replay the rest on start, follow
live, resume after a drop, and now and then write a snapshot for the next worker to start.

A worker executes nothing while ``caught_up`` is clear. It is set only when a marker
record this follower appended has come back through the stream, so every cancel
confirmed before that moment is in the set: at start, and again after any reconnect.

Start time must not grow with history: a worker loads the newest complete snapshot of
the live cancel set (written by some worker into the snapshot stream, with the
cancellation-stream offset it covers) and replays only the records after it. Snapshots
are written when the records since the last one outnumber the live keys, or hourly; a
record in the cancellation stream announces each, so a fleet writes about one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import (
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from rmqdelay.broker.connection import (
    CONNECTION_EXCEPTIONS,
    connect_once,
    queue_starting,
    reconnect_wait,
)
from rmqdelay.broker.publisher import Publisher, properties
from rmqdelay.broker.streams import READ_TIMEOUT_S, read_stream, wait_first
from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import (
    BrokerUnavailableError,
    MessageDecodeError,
    TopologyMismatchError,
    UnroutableError,
)
from rmqdelay.core.names import Names
from rmqdelay.core.wire import (
    MARKER,
    SNAPSHOT,
    SNAPSHOT_COVERS,
    SNAPSHOT_PART,
    SNAPSHOT_PARTS,
    SNAPSHOT_TAKEN_MS,
    cancel_headers,
    decode_cancel,
    decode_snapshot_part,
    encode_snapshot_part,
    ms_to_datetime,
)
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

#: Stream records in flight to the follower; streams need a prefetch and acks.
STREAM_PREFETCH = 1000
#: Records acknowledged together (a stream ack only returns credit; one per record was a
#: large share of replay time).
ACK_EVERY = STREAM_PREFETCH // 4
#: A cancel is stamped with the time it was made. One stamped further ahead of the worker's
#: clock than this was written wrong (a due time for "now", another unit) and would cancel
#: its key until then: it is ignored, with a warning. Ahead by more than CLOCK_SKEW_WARN_S,
#: it is kept, and the clocks are said to disagree.
MAX_CANCEL_AHEAD_S = 3600.0
CLOCK_SKEW_WARN_S = 60.0
#: How often expired cancels are forgotten and the need for a snapshot is checked.
MAINTAIN_EVERY_S = 60.0
#: A snapshot is due when the records since the last one reach max(this, live keys)...
SNAPSHOT_MIN_RECORDS = 100_000
#: ...or when the last one is older than this and records came since.
SNAPSHOT_EVERY_S = 3600.0
#: A starting worker reads the snapshots written this far back (a few SNAPSHOT_EVERY_S).
SNAPSHOT_LOOKBACK_S = 3 * SNAPSHOT_EVERY_S
#: Entries per snapshot message (~60 bytes each as JSON: a few MB a message).
SNAPSHOT_PART_ENTRIES = 50_000
#: How long reading the snapshot stream may take before a start falls back to replaying.
SNAPSHOT_LOAD_TIMEOUT_S = 120.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: What writing a snapshot may raise when the link drops meanwhile (the next tick retries).
_WRITE_FAILURES: tuple[type[BaseException], ...] = (
    *CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
)


@dataclass
class _Snapshot:
    """A snapshot being read from the snapshot stream."""

    covers: int
    taken_ms: int
    parts: int
    bodies: dict[int, bytes] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.bodies) == self.parts


class CancelFollower:
    """Keeps ``self.cancels`` in step with the broker's cancellation stream."""

    def __init__(
        self,
        settings: Settings,
        on_cancel: Callable[[str, int], None] | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        self.settings = settings
        #: Progress lines (snapshot loaded, caught up): a worker's log wants them, a tool
        #: that reads the set once (``quiet``) does not print them among its output.
        self._progress = log.debug if quiet else log.info
        self.cancels = CancelSet(int(settings.retention.total_seconds() * 1000))
        #: Set while every cancel confirmed before the last (re)sync is known.
        self.caught_up = asyncio.Event()
        #: When (time.monotonic()) the set stopped being current; None while it is.
        self._behind_since: float | None = time.monotonic()
        self._on_cancel = on_cancel
        #: Stream records received (cancels and markers), replays included.
        self.records_seen = 0
        #: Keys loaded from a snapshot at start, and the offset it covered (None: none).
        self.loaded_snapshot: tuple[int, int] | None = None
        self._offset: int | None = None
        self._marker: str | None = None
        self._channel: AbstractChannel | None = None
        self._connected = False
        #: Whether the current outage was reported already.
        self._outage_said = False
        self._unacked_count = 0
        #: The newest snapshot known: loaded, written, or announced in the stream.
        self._snapshot_covers = -1
        self._snapshot_taken_ms = 0
        self._snapshots_exist = True

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream until ``stop`` is set, reconnecting after drops."""
        lost_at = time.monotonic()
        maintaining = asyncio.create_task(self._maintain_periodically())
        try:
            while not stop.is_set():
                try:
                    await self._follow(stop)
                except CONNECTION_EXCEPTIONS as e:
                    self.pause()
                    # One warning an outage; each further attempt at debug (the line
                    # "cancellation set caught up" says when it is over).
                    say, self._outage_said = log.debug if self._outage_said else log.warning, True
                    if self._connected:  # a new outage, not another failed attempt
                        lost_at, self._connected = time.monotonic(), False
                    wait = reconnect_wait(time.monotonic() - lost_at)
                    say("cancellation stream lost (%s); reconnecting in %.1fs", e, wait)
                    await _sleep_or_stop(stop, wait)
        finally:
            maintaining.cancel()
            self.pause()

    def pause(self) -> None:
        """Stop vouching for the set until a new marker comes back (a connection dropped)."""
        self.caught_up.clear()
        self._marker = None
        if self._behind_since is None:
            self._behind_since = time.monotonic()

    def behind_s(self) -> float:
        """How long the set has not been current (0.0 while it is)."""
        since = self._behind_since
        return 0.0 if since is None else time.monotonic() - since

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
        connection = await connect_once(self.settings, raw=True)  # run() retries
        # closed() only resolves on a close we asked for; a dropped link fires the callbacks.
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        async with connection:
            if self._offset is None:  # the first start, not a reconnect
                await self._load_snapshot(connection)
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=STREAM_PREFETCH)
            stream = self.settings.names.cancels
            # Resume after the last record seen: a reconnect must not replay from the start
            # (nor skip what came in while we were away).
            offset: int | str = "first" if self._offset is None else self._offset + 1
            raw = await channel.get_underlay_channel()
            try:
                # aiormq's consumer, not aio-pika's: a replay reads millions of records, and
                # aio-pika's message objects cost more than the record's own work.
                await raw.basic_consume(
                    stream, self._on_record, arguments={"x-stream-offset": offset}
                )
            except (ChannelNotFoundEntity, ChannelPreconditionFailed) as e:
                if queue_starting(e):  # right after a broker restart: try again shortly
                    raise ConnectionError(f"cancellation stream not available yet: {e}") from e
                if isinstance(e, ChannelPreconditionFailed):
                    raise
                raise TopologyMismatchError(
                    f"cancellation stream {stream!r} does not exist; declare the topology "
                    "('rmqdelay declare') or set RMQDELAY_DECLARE=true"
                ) from e
            # A consumer the broker cancels (the stream was deleted) looks like a lost link:
            # reconnecting finds the stream gone and says so, instead of following nothing.
            raw.on_consumer_cancel_callbacks.add(lambda *_: lost.set())
            self._channel, self._connected, self._outage_said = channel, True, False
            try:
                await self.resync()
                await wait_first(lost, stop)
            finally:
                self._channel = None
            if lost.is_set() and not stop.is_set():
                raise ConnectionError("connection to the cancellation stream was lost")

    async def _on_record(self, message: DeliveredMessage) -> None:
        self.records_seen += 1
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._offset = offset
        marker = headers.get(MARKER)
        if marker is not None:
            await self._ack(message, now=True)  # nothing may wait behind a marker
            if marker == self._marker:
                self._progress("cancellation set caught up: %d keys", len(self.cancels))
                self.caught_up.set()
                self._behind_since = None
            return
        if SNAPSHOT in headers:
            self._snapshot_announced(headers)
        else:
            self._add(headers)
        await self._ack(message)

    async def _ack(self, message: DeliveredMessage, *, now: bool = False) -> None:
        self._unacked_count += 1
        if now or self._unacked_count >= ACK_EVERY:
            self._unacked_count = 0
            tag = getattr(message.delivery, "delivery_tag", None)
            if tag is not None and not message.channel.is_closed:
                await message.channel.basic_ack(tag, multiple=True)

    def _add(self, headers: Mapping[str, Any]) -> None:
        try:
            key, at_ms, until_ms = decode_cancel(headers)
        except MessageDecodeError as e:
            log.warning("ignoring a malformed cancel record: %s", e)
            return
        now_ms = _now_ms()
        ahead_s = (at_ms - now_ms) / 1000
        if ahead_s > MAX_CANCEL_AHEAD_S:
            # It would suppress its key, tasks scheduled later included, until then.
            log.warning(
                "ignoring the cancel of key %r: it is stamped %s, %.0f s ahead of this "
                "worker's clock; a cancel carries the time it was made, in integer ms",
                key, ms_to_datetime(at_ms).isoformat(), ahead_s,
            )  # fmt: skip
            return
        if ahead_s > CLOCK_SKEW_WARN_S:
            log.warning(
                "the cancel of key %r is stamped %.0f s ahead of this worker's clock: are "
                "the clocks of its publisher and of this worker apart?", key, ahead_s,
            )  # fmt: skip
        if self.cancels.add(key, at_ms, now_ms, until_ms) and self._on_cancel is not None:
            self._on_cancel(key, at_ms)

    def _snapshot_announced(self, headers: Mapping[str, Any]) -> None:
        covers, taken = _counts(headers, SNAPSHOT_COVERS, SNAPSHOT_TAKEN_MS)
        if taken >= 0 and covers > self._snapshot_covers:
            self._snapshot_covers, self._snapshot_taken_ms = covers, taken

    async def _load_snapshot(self, connection: Any) -> None:
        """Load the newest complete snapshot written in the last SNAPSHOT_LOOKBACK_S, and
        resume the cancellation stream after the offset it covers. Without one (a new
        namespace, or no worker ran for hours), the whole stream is replayed instead."""
        started = time.monotonic()
        names = self.settings.names
        since = datetime.now(UTC) - timedelta(seconds=SNAPSHOT_LOOKBACK_S)
        try:
            # prefetch 4: parts are megabytes each
            records = await read_stream(
                connection,
                names.cancel_snapshots,
                offset=since,
                prefetch=4,
                timeout_s=SNAPSHOT_LOAD_TIMEOUT_S,
            )
        except TopologyMismatchError:
            self._snapshots_exist = False
            log.warning(
                "no snapshot stream %r: workers replay the whole cancellation stream at "
                "start. Declare the topology again (or import definitions.json)",
                names.cancel_snapshots,
            )
            return
        except BrokerUnavailableError:
            log.warning(
                "reading snapshots took over %.0fs: replaying instead", SNAPSHOT_LOAD_TIMEOUT_S
            )
            return
        snapshots: dict[str, _Snapshot] = {}
        for message in records:
            headers = message.headers or {}
            if isinstance(sid := headers.get(SNAPSHOT), str):
                self._collect(snapshots, sid, headers, message.body)
        complete = [s for s in snapshots.values() if s.complete]
        if not complete:
            self._progress(
                "no cancel snapshot in the last %.0fh: replaying the cancellation stream",
                SNAPSHOT_LOOKBACK_S / 3600,
            )
            return
        best = max(complete, key=lambda s: s.covers)
        now = _now_ms()
        for i in range(best.parts):
            for key, at_ms, until_ms in decode_snapshot_part(best.bodies[i]):
                self.cancels.add(key, at_ms, now, until_ms)
        self._offset = best.covers
        self._snapshot_covers, self._snapshot_taken_ms = best.covers, best.taken_ms
        self.loaded_snapshot = (len(self.cancels), best.covers)
        self._progress(
            "loaded a cancel snapshot of %d keys (to offset %d, %.0fs old) in %.1fs",
            len(self.cancels),
            best.covers,
            (now - best.taken_ms) / 1000,
            time.monotonic() - started,
        )

    @staticmethod
    def _collect(
        snapshots: dict[str, _Snapshot], sid: str, headers: Mapping[str, Any], body: bytes
    ) -> None:
        part, parts, covers, taken = _counts(
            headers, SNAPSHOT_PART, SNAPSHOT_PARTS, SNAPSHOT_COVERS, SNAPSHOT_TAKEN_MS
        )
        if min(part, parts, covers, taken) < 0 or part >= parts:
            log.warning("ignoring a malformed snapshot part of %s", sid)
            return
        snapshot = snapshots.setdefault(sid, _Snapshot(covers, taken, parts))
        snapshot.bodies[part] = body
        if snapshot.complete:  # older snapshots are of no more use: free their memory
            for other in [k for k, s in snapshots.items() if s.covers < covers]:
                del snapshots[other]

    def snapshot_due(self) -> bool:
        """Whether this follower should write a snapshot now (see the module docstring)."""
        if not (self._snapshots_exist and self.caught_up.is_set()) or self._offset is None:
            return False
        since = self._offset - self._snapshot_covers
        if since >= max(SNAPSHOT_MIN_RECORDS, len(self.cancels)):
            return True
        stale = _now_ms() - self._snapshot_taken_ms >= SNAPSHOT_EVERY_S * 1000
        return stale and since > 2  # more than the last announcement and a marker

    async def write_snapshot(self) -> int:
        """Write the live cancel set to the snapshot stream and announce it; returns the
        number of keys. Raises ConnectionError when not following the stream."""
        channel, covers = self._channel, self._offset
        if channel is None or channel.is_closed or covers is None:
            raise ConnectionError("not following the cancellation stream")
        entries = list(self.cancels.items())  # no await above: the set matches ``covers``
        taken, sid, names = _now_ms(), uuid.uuid4().hex, self.settings.names
        chunks = [
            entries[i : i + SNAPSHOT_PART_ENTRIES]
            for i in range(0, len(entries), SNAPSHOT_PART_ENTRIES)
        ] or [[]]
        about: dict[str, Any] = {SNAPSHOT: sid, SNAPSHOT_COVERS: covers, SNAPSHOT_TAKEN_MS: taken}
        for i, chunk in enumerate(chunks):
            body = await asyncio.to_thread(encode_snapshot_part, chunk)
            headers: dict[str, Any] = {**about, SNAPSHOT_PART: i, SNAPSHOT_PARTS: len(chunks)}
            await channel.default_exchange.publish(
                aio_pika.Message(body, headers=headers, delivery_mode=2),
                routing_key=names.cancel_snapshots,
            )
        # Every follower learns of it through the cancellation stream, and holds off its own.
        await channel.default_exchange.publish(
            aio_pika.Message(b"", headers=about, delivery_mode=2), routing_key=names.cancels
        )
        self._snapshot_covers, self._snapshot_taken_ms = covers, taken
        log.info("wrote a cancel snapshot of %d keys (to offset %d)", len(entries), covers)
        return len(entries)

    async def _maintain_periodically(self) -> None:
        while True:
            await asyncio.sleep(MAINTAIN_EVERY_S)
            if forgotten := self.cancels.expire(_now_ms()):
                log.info("forgot %d expired cancels", forgotten)
            if self.snapshot_due():
                # Spread a fleet's writers out: the first announcement holds off the rest.
                await asyncio.sleep(random.uniform(0, MAINTAIN_EVERY_S / 2))
                if self.snapshot_due():
                    try:
                        await self.write_snapshot()
                    except _WRITE_FAILURES as e:
                        log.warning("could not write a cancel snapshot: %s", e)
                    except Exception:  # expiry must go on whatever a snapshot ran into
                        log.exception("could not write a cancel snapshot")


def _counts(headers: Mapping[str, Any], *names: str) -> list[int]:
    """These integer headers, -1 for any missing or not an integer (records from other
    clients are not trusted to be well formed)."""
    values = [headers.get(name) for name in names]
    return [v if isinstance(v, int) and not isinstance(v, bool) else -1 for v in values]


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def publish_cancel(
    publisher: Publisher, names: Names, key: str, at_ms: int, until_ms: int | None
) -> None:
    """Append a cancel record (confirmed, through outages like every publish).

    Raises:
        TopologyMismatchError: there is no cancellation stream.
    """
    stream = names.cancels
    try:
        await publisher.publish(
            b"", properties(cancel_headers(key, at_ms, until_ms)), "", stream, what=repr(stream)
        )
    except UnroutableError as e:
        raise TopologyMismatchError(
            f"cancellation stream {stream!r} does not exist; declare the topology "
            "('rmqdelay declare') or set RMQDELAY_DECLARE=true"
        ) from e


async def load_cancels(settings: Settings) -> CancelSet:
    """The cancel set as a worker starting now would have it (snapshot, then the rest):
    for tools that need to know what is cancelled.

    Raises:
        BrokerUnavailableError: it could not be loaded in time.
    """
    follower = CancelFollower(settings, quiet=True)
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
