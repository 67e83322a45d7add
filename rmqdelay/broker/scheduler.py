"""The publisher side: ``Scheduler.schedule()`` sends a task into the delay levels."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Iterable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeAlias

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError, ChannelNotFoundEntity
from pamqp.commands import Basic

from rmqdelay.broker import tracing
from rmqdelay.broker.cancels import load_cancels, publish_cancel
from rmqdelay.broker.connection import PUBLISH_RETRYABLE, connect
from rmqdelay.broker.declare import check_topology, declare_topology, resolve_backend
from rmqdelay.broker.journal import LiveJournal, read_journal, read_record
from rmqdelay.broker.publisher import Publisher, properties, restored, until_deadline
from rmqdelay.broker.streams import read_stream
from rmqdelay.core.cancelset import Stamps
from rmqdelay.core.delays import delay_to_us, describe_us
from rmqdelay.core.errors import (
    BatchNotConfirmedError,
    BrokerBlockedError,
    BrokerUnavailableError,
    InvalidDelayError,
    InvalidKeyError,
    InvalidQueryError,
    InvalidTaskError,
    TaskDueTooSoonError,
    TaskNotPendingError,
    TopologyMismatchError,
    UnroutableError,
)
from rmqdelay.core.journal import MAX_PAGE, Entry, Query, TaskIndex, decode_cursor, page_of
from rmqdelay.core.recurrence import (
    MAX_SERIES_KEY_BYTES,
    MIN_EVERY_MS,
    SERIES,
    Rule,
    Series,
    SeriesHeader,
    check_catch_up,
    check_rule,
    compact,
    describe_series,
    occurrence_key,
    series_record,
)
from rmqdelay.core.retry import BACKOFF_BASE_MS, BACKOFF_CAP_MS, MAX_ATTEMPTS
from rmqdelay.core.routes import Route
from rmqdelay.core.task import Cancellation, PendingTask, ScheduledTask, TaskPage
from rmqdelay.core.topology import build_topology, destination_topology
from rmqdelay.core.wire import (
    DUE_MS,
    PAST_DUE_TOLERANCE_MS,
    PUBLISHED_MS,
    check_key,
    check_keys,
    check_size,
    encode_payload,
    ms_to_datetime,
    task_headers,
)
from rmqdelay.core.wiring import Wiring
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: A task due sooner than this is not rescheduled: a worker may be about to run it, and
#: the cancel of the old copy must reach every worker before then (it takes milliseconds
#: when they keep up; docs/design.md, "Reschedule").
RESCHEDULE_MARGIN_S = 1.0
_US = timedelta(microseconds=1)
#: Index entries counted between yields to the event loop (count_pending).
COUNT_SLICE = 20_000


def _due_us(now_us: int, delay: timedelta | float | None, at: datetime | None) -> int:
    if (delay is None) == (at is None):
        raise InvalidDelayError(
            f"give exactly one of delay= or at= (got delay={delay!r}, at={at!r})"
        )
    if at is not None:
        if not isinstance(at, datetime):
            raise InvalidDelayError(f"at must be a datetime, got {type(at).__name__} ({at!r})")
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidDelayError(
                f"at={at.isoformat()} is naive; give a timezone-aware datetime "
                "(e.g. datetime.now(UTC) + ...), since the publisher's local zone is a guess"
            )
        return (at - _EPOCH) // _US
    assert delay is not None
    return now_us + delay_to_us(delay)


class TaskSpec(NamedTuple):
    """One task for ``Scheduler.schedule_many()``: the arguments of ``schedule()``.

    (A named tuple: immutable, and built in a fraction of a frozen dataclass's time.)
    """

    destination: str
    payload: Any
    delay: timedelta | float | None = None
    at: datetime | None = None
    content_type: str | None = None
    task_id: str | None = None
    keys: Iterable[str] = ()
    replace: bool = False
    max_attempts: int | None = None
    backoff_base: timedelta | float | None = None
    backoff_cap: timedelta | float | None = None


class CheckedTask(NamedTuple):
    """A task's parts once every check that needs no broker has passed."""

    destination: str
    body: bytes
    content_type: str
    keys: tuple[str, ...]
    task_id: str
    overrides: dict[str, int]
    delay: timedelta | float | None
    at: datetime | None
    replace: bool
    #: The route of a ``delay=`` task, which does not depend on when it is sent.
    route: Route | None


def check_task(wiring: Wiring, spec: TaskSpec) -> CheckedTask:
    """Everything ``schedule()`` refuses before any I/O; the CLI calls it before connecting.

    Raises:
        InvalidTaskError: naming the bad value.
    """
    destination = wiring.names.check_destination(spec.destination)
    body, content_type = encode_payload(spec.payload, spec.content_type)
    check_size(body, wiring.max_message_size)
    keys = spec.keys
    keys = check_keys(
        tuple(keys) if isinstance(keys, Iterable) and not isinstance(keys, str | bytes) else keys
    )
    if spec.replace and not keys:
        raise InvalidKeyError("replace=True needs keys: it cancels the tasks under them")
    task_id = new_task_id() if spec.task_id is None else check_key(spec.task_id, "a task id")
    overrides = _retry_overrides(spec.max_attempts, spec.backoff_base, spec.backoff_cap)
    now_us = time.time_ns() // 1000
    # Routing now refuses a delay over the maximum before anything is sent.
    way = wiring.route(_due_us(now_us, spec.delay, spec.at) - now_us, task_id)
    return CheckedTask(
        destination,
        body,
        content_type,
        keys,
        task_id,
        overrides,
        spec.delay,
        spec.at,
        spec.replace,
        way if spec.at is None else None,
    )


def new_task_id() -> str:
    """A random 128-bit id as 32 hex digits (as ``uuid4().hex``, at a fraction of the cost)."""
    return os.urandom(16).hex()


#: A task ready to publish: body, properties, route, and what ``schedule()`` returns.
_Prepared: TypeAlias = tuple[bytes, Basic.Properties, Route, ScheduledTask]


class Scheduler:
    """Schedules tasks; use as ``async with Scheduler(Settings()) as scheduler: ...``.

    Many ``schedule()`` calls may run at once on one scheduler: they share one channel and
    their publisher confirms are pipelined, which is where throughput comes from.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        #: Layout, names and limits, fixed once the backend is resolved in ``start()``.
        self.wiring: Wiring = self.settings.wiring
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._destinations: dict[str, asyncio.Future[None]] = {}
        self._stamps = Stamps()
        #: The journal followed in memory (``follow_journal``), and how to stop it.
        self._live: tuple[LiveJournal, asyncio.Event, asyncio.Task[None]] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, choose the backend (``auto``), declare the topology (or, with ``declare``
        off, verify it) and open the channel.

        Raises:
            BrokerUnavailableError: no connection within the connect timeout.
            TopologyMismatchError: the broker's topology is not the one these settings need.
        """
        self.settings = await resolve_backend(self.settings)
        self.wiring = self.settings.wiring
        self._connection = await connect(self.settings)
        try:
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._publisher = Publisher(self.settings, self._channel)
            topology = build_topology(self.wiring.layout)
            await check_topology(self.settings, topology, self._channel)
        except BaseException:
            await self._connection.close()
            raise

    async def close(self) -> None:
        """Close the connection; schedules that already returned are safe in the broker."""
        if self._live is not None:
            _, stop, following = self._live
            self._live = None
            stop.set()
            await following
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._publisher = None

    @property
    def connection(self) -> AbstractRobustConnection:
        """The scheduler's connection (for tools that open channels of their own)."""
        if self._connection is None:
            raise _not_started()
        return self._connection

    @property
    def connected(self) -> bool:
        """Whether the link to the broker is up now (false while it is being restored)."""
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def alarm(self) -> str | None:
        """The resource alarm blocking this scheduler's publishes now, as RabbitMQ names it
        ("low on disk", "low on memory"), or None. While one is raised, ``schedule()`` and
        ``cancel()`` wait for it to clear, then fail with ``BrokerBlockedError`` at
        ``RMQDELAY_PUBLISH_DEADLINE``."""
        if self._publisher is None:
            return None
        alarm = await self._publisher.alarm()
        return None if alarm is None else alarm.reason

    async def ping(self) -> None:
        """One round trip to the broker on the scheduler's channel; raises what a broken
        link raises. (basic.qos: an answer and nothing else on a channel that only
        publishes.)"""
        raw = await self._require_channel().get_underlay_channel()
        await raw.basic_qos(prefetch_count=0)

    @property
    def publisher(self) -> Publisher:
        """The scheduler's confirmed publishing (for tools that send messages of their own)."""
        return self._require_publisher()

    async def declare_destination(self, destination: str) -> None:
        """Create ``destination``'s work queue, so tasks can be scheduled before a worker runs."""
        self.wiring.names.check_destination(destination)
        topology = destination_topology(self.wiring.layout, destination)
        await declare_topology(self._require_channel(), topology)

    async def schedule(
        self,
        destination: str,
        payload: Any,
        *,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
        content_type: str | None = None,
        task_id: str | None = None,
        keys: Iterable[str] = (),
        replace: bool = False,
        max_attempts: int | None = None,
        backoff_base: timedelta | float | None = None,
        backoff_cap: timedelta | float | None = None,
    ) -> ScheduledTask:
        """Schedule ``payload`` for ``destination`` after ``delay`` or at ``at``.

        Returns once the broker has confirmed the message: from then on it is not lost.

        Args:
            destination: Work queue to deliver to; it must exist (a worker, or
                ``declare_destination()``, creates it).
            payload: Anything JSON-serialisable, or bytes together with ``content_type``.
            delay: A timedelta or seconds; 0 delivers at once.
            at: A timezone-aware due time; one in the past delivers at once.
            content_type: Only for bytes payloads.
            task_id: Your own id (default: a new UUID). It is a cancel key too.
            keys: Cancel keys: ``cancel(key)`` calls off every task under it published
                before the cancel.
            replace: Reschedule: cancel ``keys`` first, so that of the tasks under them only
                this one runs. The cancel is confirmed before this task is published.
            max_attempts: Executions before the task is parked (default: the worker's).
            backoff_base: Backoff after the first failure (default: the worker's).
            backoff_cap: Longest backoff (default: the worker's).

        Raises:
            InvalidTaskError: bad destination, payload or delay; nothing was sent.
            UnroutableError: no work queue for ``destination``.
            PublishNotConfirmedError: the broker did not confirm the message.
        """
        spec = TaskSpec(
            destination,
            payload,
            delay=delay,
            at=at,
            content_type=content_type,
            task_id=task_id,
            keys=keys,
            replace=replace,
            max_attempts=max_attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
        )
        checked = check_task(self.wiring, spec)
        if tracing.recording():
            return (await self._traced([checked], "schedule"))[0]
        # One task: no list, no gather, one coroutine frame less on every resumption.
        [prepared] = await self._prepare([checked])
        await self._publish_task(*prepared)
        return prepared[-1]

    async def schedule_many(self, tasks: Iterable[TaskSpec]) -> list[ScheduledTask]:
        """Schedule a batch: every task is checked before anything is sent, all are
        published at once, and this returns once the broker has confirmed every one.

        Raises:
            InvalidTaskError: a task is refused (its index is named); nothing was sent.
            BatchNotConfirmedError: some tasks were not confirmed; it says which were.
        """
        checked = []
        for i, spec in enumerate(tasks):
            try:
                checked.append(check_task(self.wiring, spec))
            except InvalidTaskError as e:
                raise type(e)(f"task {i} of the batch: {e}") from e
        if not checked:
            return []
        if tracing.recording():
            return await self._traced(checked, "schedule_many")
        return await self._publish_batch(await self._prepare(checked))

    async def _traced(self, checked: list[CheckedTask], name: str) -> list[ScheduledTask]:
        """Publish inside a schedule span whose context the messages carry (``tracing``)."""
        first = checked[0]
        with tracing.producing(
            name, destination=first.destination, task_id=first.task_id, batch=len(checked)
        ):
            prepared = await self._prepare(checked)
            for _, props, _, _ in prepared:
                assert props.headers is not None
                tracing.inject(props.headers)
            if len(prepared) == 1:
                await self._publish_task(*prepared[0])
                return [prepared[0][-1]]
            return await self._publish_batch(prepared)

    async def _publish_batch(self, prepared: list[_Prepared]) -> list[ScheduledTask]:
        sent = await asyncio.gather(
            *(self._publish_task(*p) for p in prepared), return_exceptions=True
        )
        failed = {i: e for i, e in enumerate(sent) if isinstance(e, BaseException)}
        if failed:
            raise BatchNotConfirmedError(
                [None if i in failed else p[-1] for i, p in enumerate(prepared)], failed
            )
        return [p[-1] for p in prepared]

    async def _prepare(self, checked: list[CheckedTask]) -> list[_Prepared]:
        """The messages of checked tasks, once their work queues are known to exist and
        the keys they replace are cancelled."""
        for destination in dict.fromkeys(c.destination for c in checked):
            await self._check_destination(destination)
        for key in dict.fromkeys(k for c in checked if c.replace for k in c.keys):
            await self.cancel(key)
        # Timing is computed after the checks and cancels: they take time, the delay does not.
        now_us = time.time_ns() // 1000
        return [self._message(c, now_us) for c in checked]

    def _message(self, checked: CheckedTask, now_us: int) -> _Prepared:
        due_us = _due_us(now_us, checked.delay, checked.at)
        if now_us - due_us > PAST_DUE_TOLERANCE_MS * 1000:
            log.warning(
                "task %s for %s is due %s in the past (at=%s); it runs at once",
                checked.task_id,
                checked.destination,
                describe_us(now_us - due_us),
                checked.at.isoformat() if checked.at else None,
            )
        way = checked.route or self.wiring.route(due_us - now_us, checked.task_id)
        headers = task_headers(
            checked.task_id,
            due_ms=-(-due_us // 1000),
            published_ms=self._stamps.publish(now_us // 1000),
            route=way.headers,
            keys=checked.keys,
        )
        if checked.overrides:
            headers.update(checked.overrides)
        props = properties(headers, content_type=checked.content_type, message_id=checked.task_id)
        scheduled = ScheduledTask(
            checked.task_id, checked.destination, _EPOCH + due_us * _US, way.hops, checked.keys
        )
        return checked.body, props, way, scheduled

    async def recurring(
        self,
        destination: str,
        payload: Any,
        *,
        key: str,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str | None = None,
        catch_up: str = "once",
        content_type: str | None = None,
    ) -> Series:
        """Add a recurring series under ``key``, or replace the one already under it.

        The series lives in the broker: its one pending occurrence carries the rule, and
        the worker that takes an occurrence schedules the next (confirmed) before it runs
        the handler. ``cancel(key)`` stops it. Returns once the first occurrence and the
        registry record are confirmed.

        Args:
            cron: Five-field cron expression, read in ``tz`` (default UTC).
            every: An interval (timedelta or seconds, at least 1 s); the first occurrence
                is one interval from now.
            catch_up: After downtime: ``once`` runs one occurrence for all that were
                missed, ``all`` runs each, ``skip`` runs none and waits for the next.

        Raises:
            InvalidRecurrenceError: a bad rule, zone or catch-up; nothing was sent.
            InvalidTaskError: a bad destination, payload or key; nothing was sent.
            UnroutableError: no work queue for ``destination``.
            PublishNotConfirmedError: the broker did not confirm; call again (it replaces).
        """
        key = check_key(key, "a series key")
        if len(key.encode()) > MAX_SERIES_KEY_BYTES:
            raise InvalidKeyError(
                f"series key {key[:40]!r}... is over {MAX_SERIES_KEY_BYTES} bytes of UTF-8"
            )
        now_ms = time.time_ns() // 1_000_000
        rule = check_rule(cron=cron, every=every, tz=tz, now_ms=now_ms)
        policy = check_catch_up(catch_up)
        first = rule.anchor_ms if rule.every_ms is not None else rule.next_after(now_ms)
        checked = check_task(
            self.wiring,
            TaskSpec(
                destination,
                payload,
                at=ms_to_datetime(first),
                content_type=content_type,
                keys=(key, occurrence_key(key, first)),
            ),
        )
        await self._check_destination(checked.destination)
        await self.cancel(key)  # the series it replaces, if any, stops here
        body, props, way, scheduled = self._message(checked, time.time_ns() // 1000)
        assert props.headers is not None
        published = props.headers[PUBLISHED_MS]
        assert isinstance(published, int)
        header = SeriesHeader(key, rule, policy, published)
        props.headers[SERIES] = header.encode()
        await self._publish_task(body, props, way, scheduled)
        await self.publish_series_record(series_record(header, checked.destination))
        return describe_series(header, checked.destination, now_ms, 3)

    async def remove_series(self, key: str) -> Cancellation:
        """Stop the series under ``key`` (its pending occurrence is cancelled) and drop it
        from the registry."""
        cancellation = await self.cancel(key)
        header = SeriesHeader(key, Rule(None, MIN_EVERY_MS, "UTC", 0), "once", 0)
        await self.publish_series_record(series_record(header, "", removed=True))
        return cancellation

    async def series(self) -> list[Series]:
        """The recurring series: the registry, compacted, less those cancelled since."""
        records = await read_stream(self.connection, self.wiring.names.series)
        live = compact([record.body for record in records])
        if not live:
            return []
        cancels = await load_cancels(self.settings)
        now_ms = time.time_ns() // 1_000_000
        return [
            describe_series(header, destination, now_ms, 3)
            for header, destination in sorted(live.values(), key=lambda v: v[0].key)
            if cancels.cancelled_by((header.key,), header.since_ms) is None
        ]

    async def publish_series_record(self, body: bytes) -> None:
        """Append ``body`` to the series registry stream (for tools that copy series)."""
        stream = self.wiring.names.series
        try:
            await self._require_publisher().publish(
                body, properties({}), "", stream, what="the series record"
            )
        except UnroutableError as e:
            raise TopologyMismatchError(
                f"stream {stream!r} does not exist; declare the topology "
                "('rmqdelay declare') or import definitions.json again"
            ) from e

    async def cancel(
        self,
        key: str,
        *,
        until: datetime | timedelta | float | None = None,
        count: bool = False,
    ) -> Cancellation:
        """Call off every task under ``key`` (or with id ``key``) published before now.

        Returns once the broker has confirmed the cancel record. Tasks scheduled under the
        same key afterwards run normally. Cancelling a key with nothing pending is fine.

        Workers keep the cancel until ``until`` (a time, or a delay from now), then forget
        it: pass the due time of the latest task being called off when you know it, so the
        cancel set stays small. By default they keep it as long as any task can wait
        (RMQDELAY_MAX_DELAY, or RMQDELAY_CANCEL_RETENTION); a later ``until`` is cut to that.

        Args:
            count: Look in the journal first, and return in ``Cancellation.pending`` how
                many pending tasks were under the key (see ``get()`` for what that costs).

        Raises:
            InvalidKeyError: ``key`` is not a usable key; nothing was sent.
            InvalidDelayError: ``until`` is in the past or not a time; nothing was sent.
            JournalUnavailableError: ``count`` without a journal to count in; nothing was sent.
            PublishNotConfirmedError: the broker did not confirm the record.
        """
        key = check_key(key)
        now_ms = time.time_ns() // 1_000_000
        until_ms = None
        if until is not None:
            if isinstance(until, datetime):
                until_us = _due_us(0, None, until)
            else:
                until_us = _due_us(now_ms * 1000, until, None)
            if until_us < now_ms * 1000:
                shown = until.isoformat() if isinstance(until, datetime) else repr(until)
                raise InvalidDelayError(
                    f"until={shown} is in the past: a cancel must last at least until the "
                    "tasks it calls off are due"
                )
            until_ms = -(-until_us // 1000)
        pending = None
        if count:
            index = await self._read_journal()
            pending = len(index.pending(time.time_ns() // 1_000_000, Query(key=key)))
        at_ms = self._stamps.cancel(time.time_ns() // 1_000_000)
        await self._publish_cancel(key, at_ms, until_ms)
        log.debug("cancelled %r at %d", key, at_ms)
        return Cancellation(key, _EPOCH + at_ms * 1000 * _US, pending)

    async def _publish_cancel(self, key: str, at_ms: int, until_ms: int | None) -> None:
        await publish_cancel(self._require_publisher(), self.wiring.names, key, at_ms, until_ms)

    async def follow_journal(self, *, wait: bool = False) -> None:
        """Keep an index of the pending tasks in memory from now on, following the journal
        and the cancels as they are written: ``get()``, ``find()`` and ``reschedule()``
        then answer without reading the whole journal (for a long-running process, such
        as ``rmqdelay serve``). Returns at once; lookups wait (up to 30 s, then raise
        ``BrokerUnavailableError``) until the journal has been read up to now once;
        ``wait=True`` returns only then (about 7,000 records a second).

        Raises:
            JournalUnavailableError: no journal to follow (RMQDELAY_JOURNAL, the plugin).
        """
        if self._live is None:
            live, stop = LiveJournal(self.settings), asyncio.Event()
            self._live = (live, stop, asyncio.create_task(live.run(stop)))
        if wait:
            await self._live[0].loaded()

    async def _read_journal(self) -> TaskIndex:
        if self._live is not None:
            return await self._live[0].synced()
        return await read_journal(self.settings, self.connection)

    async def _whole(self, entry: Entry) -> Entry:
        """``entry`` with its body (a followed index keeps entries without)."""
        if entry.whole:
            return entry
        return await read_record(self.settings, self.connection, entry.offset)

    async def get(self, task_id: str) -> PendingTask | None:
        """The pending task with id ``task_id``, with its payload and properties; None if
        there is none (it ran, was cancelled, or never was).

        Unless ``follow_journal()`` was called, the whole journal is read each time:
        about 7,000 records a second (every task scheduled within its retention).

        Raises:
            InvalidKeyError: ``task_id`` cannot be a task id.
            JournalUnavailableError: no journal to look in (RMQDELAY_JOURNAL, the plugin).
        """
        task_id = check_key(task_id, "a task id")
        index = await self._read_journal()
        entry = index.get(task_id, time.time_ns() // 1_000_000)
        return None if entry is None else (await self._whole(entry)).task()

    async def find(
        self,
        *,
        key: str | None = None,
        destination: str | None = None,
        due_before: datetime | None = None,
        due_after: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TaskPage:
        """Pending tasks, soonest due first: those under ``key`` (or with that id), for
        ``destination``, due before ``due_before`` and at or after ``due_after`` (each
        filter only if given). Pass the page's ``cursor`` back for the next page.

        A task is pending until its due time (then it is in its work queue, running, or
        done), unless cancelled; a retry waiting out its backoff is pending again.

        Raises:
            InvalidQueryError: a bad filter, limit (1 to 1000) or cursor.
            JournalUnavailableError: no journal to look in (RMQDELAY_JOURNAL, the plugin).
        """
        query = self._query(key, destination, due_before, due_after, limit, cursor)
        index = await self._read_journal()
        entries, more = index.find(time.time_ns() // 1_000_000, query)
        return page_of(entries, more)

    async def count_pending(self, window_ends_s: list[float]) -> dict[str, list[int]]:
        """Pending tasks per destination, by due window: how many are due within each of
        ``window_ends_s`` from now (ascending), and a last count for the rest.

        Every task in the index is looked at (about a second per million here), in slices
        between which the event loop runs others; a dashboard calls it now and then, not
        per request.

        Raises:
            JournalUnavailableError: no journal to count in (RMQDELAY_JOURNAL, the plugin).
        """
        index = await self._read_journal()
        now_ms = time.time_ns() // 1_000_000
        ends_ms = [now_ms + round(s * 1000) for s in window_ends_s]
        entries = list(index.all())  # the index changes while we yield
        counts: dict[str, list[int]] = {}
        for start in range(0, len(entries), COUNT_SLICE):
            index.tally(entries[start : start + COUNT_SLICE], now_ms, ends_ms, counts)
            await asyncio.sleep(0)
        return counts

    def _query(
        self,
        key: str | None,
        destination: str | None,
        due_before: datetime | None,
        due_after: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> Query:
        try:
            if key is not None:
                check_key(key)
            if destination is not None:
                self.wiring.names.check_destination(destination)
            before = None if due_before is None else -(-_due_us(0, None, due_before) // 1000)
            after = None if due_after is None else -(-_due_us(0, None, due_after) // 1000)
        except InvalidTaskError as e:
            raise InvalidQueryError(str(e)) from None
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidQueryError(f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
        if cursor is not None:
            try:
                decode_cursor(cursor)
            except ValueError as e:
                raise InvalidQueryError(str(e)) from None
        return Query(key, destination, before, after, limit, cursor)

    async def reschedule(
        self,
        key_or_id: str,
        *,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
    ) -> ScheduledTask:
        """Move a pending task to a new due time, ``delay`` from now or ``at``, without its
        payload: the task with this id, or the one pending task under this key.

        A copy with the new due time is published (confirmed), then the old one is
        cancelled (confirmed): exactly one of them runs. A task due within
        RESCHEDULE_MARGIN_S may be running already and is not moved (it raises, and runs
        as scheduled). Should this process die between the two steps, both may run.

        Raises:
            InvalidDelayError: bad ``delay``/``at``; nothing was sent.
            InvalidKeyError: the key has several pending tasks (reschedule each by id).
            TaskNotPendingError: nothing pending under it.
            TaskDueTooSoonError: it is due too soon to move (it runs as scheduled).
            JournalUnavailableError: no journal to look in (RMQDELAY_JOURNAL, the plugin).
            InvalidTaskError: it is an occurrence of a recurring series (use recurring()).
        """
        key = check_key(key_or_id, "a task id or key")
        now_us = time.time_ns() // 1000
        due_us = _due_us(now_us, delay, at)
        self.wiring.route(due_us - now_us)  # refuses a delay over the maximum before reading
        index = await self._read_journal()
        now_ms = time.time_ns() // 1_000_000
        entry = index.get(key, now_ms)
        if entry is None:
            under = index.pending(now_ms, Query(key=key))
            if len(under) > 1:
                shown = ", ".join(e.id for e in under[:5])
                raise InvalidKeyError(
                    f"key {key!r} has {len(under)} pending tasks ({shown}"
                    f"{', ...' if len(under) > 5 else ''}); reschedule each by its id"
                )
            if not under:
                raise TaskNotPendingError(
                    f"no pending task has id or key {key!r}: it ran (or is due now), was "
                    "cancelled, or was never scheduled in this namespace"
                )
            entry = under[0]
        if entry.series is not None:
            raise InvalidTaskError(
                f"task {entry.id} is an occurrence of series {entry.series[0]!r}: change a "
                "series by calling recurring() again with its key (it replaces the series)"
            )
        left_ms = entry.due_ms - now_ms
        if left_ms < RESCHEDULE_MARGIN_S * 1000:
            raise TaskDueTooSoonError(
                f"task {entry.id} is due in {left_ms / 1000:.3f}s: too soon to move safely "
                f"(under {RESCHEDULE_MARGIN_S:g}s, a worker may be running it already), so it "
                "runs as scheduled; cancel it instead if it must not"
            )
        await self._check_destination(entry.destination)
        entry = await self._whole(entry)
        now_ms = time.time_ns() // 1_000_000
        way = self.wiring.route(due_us - now_ms * 1000, entry.id)
        # Later than the copy it replaces even within one millisecond (or stamped by a
        # clock ahead of ours): the cancel at stamp - 1 must call that copy off and not
        # this one. Through Stamps, so that a cancel made after this still hits it.
        stamp = self._stamps.publish(max(now_ms, entry.published_ms + 1))
        headers = {
            **entry.headers,
            DUE_MS: -(-due_us // 1000),
            PUBLISHED_MS: stamp,
            **way.headers,
        }
        props = restored(entry.content_type, headers, entry.properties)
        scheduled = ScheduledTask(
            entry.id, entry.destination, _EPOCH + due_us * _US, way.hops, entry.keys
        )
        await self._publish_task(entry.body, props, way, scheduled)
        await self._publish_cancel(entry.id, stamp - 1, None)
        log.debug("rescheduled %s from %d to %d", entry.id, entry.due_ms, due_us // 1000)
        return scheduled

    def _publish_task(
        self, body: bytes, props: Basic.Properties, way: Route, scheduled: ScheduledTask
    ) -> Coroutine[Any, Any, None]:
        # A plain function returning the publish: no coroutine frame of its own to resume.
        return self._require_publisher().publish(
            body,
            props,
            way.exchange,
            scheduled.destination,
            mandatory=way.mandatory,
            what=f"the task for {scheduled.destination!r}",
        )

    async def _check_destination(self, destination: str) -> None:
        """Fail early when no work queue exists: otherwise the task would surface only at
        its due time, in the unroutable queue. Checked once per destination and scheduler."""
        pending = self._destinations.get(destination)
        if (
            pending is not None
            and pending.done()
            and not pending.cancelled()
            and pending.exception() is None
        ):
            return  # the usual case, on every schedule(): known to exist
        if pending is None:
            pending = asyncio.ensure_future(self._queue_exists(destination))
            self._destinations[destination] = pending
        try:
            await asyncio.shield(pending)
        except Exception:
            if self._destinations.get(destination) is pending:
                del self._destinations[destination]  # not cached: a later call asks again
            raise

    async def require_destination(self, destination: str) -> None:
        """Raise ``UnroutableError`` unless ``destination`` has a work queue now (asked of
        the broker each time; ``schedule()`` remembers a queue it has seen)."""
        await self._queue_exists(destination)

    async def _queue_exists(self, destination: str) -> None:
        """Ask the broker, through an outage as long as a publish would wait for it."""
        deadline = self.settings.publish_deadline.total_seconds()
        ends = time.monotonic() + deadline
        try:
            async for attempt in until_deadline(deadline, PUBLISH_RETRYABLE):
                with attempt:
                    # Bounded: a connection blocked by a resource alarm is not read at all,
                    # and the channel's open would wait for as long as the alarm lasts.
                    async with asyncio.timeout(max(0.001, ends - time.monotonic())):
                        await self._passive_declare(destination)
        except PUBLISH_RETRYABLE as e:
            if (alarm := await self.alarm()) is not None:
                raise BrokerBlockedError(
                    f"could not check that destination {destination!r} exists within "
                    f"RMQDELAY_PUBLISH_DEADLINE ({deadline:g}s): the broker at "
                    f"{self.settings.safe_url} blocks this connection, resource alarm "
                    f"{alarm!r}; nothing was published",
                    alarm=alarm,
                ) from e
            raise BrokerUnavailableError(
                f"could not check that destination {destination!r} exists within "
                f"RMQDELAY_PUBLISH_DEADLINE ({deadline:g}s): the broker at "
                f"{self.settings.safe_url} is unreachable ({e or type(e).__name__}); "
                "nothing was published"
            ) from e

    async def _passive_declare(self, destination: str) -> None:
        if self._connection is None:
            raise _not_started()
        queue = self.wiring.names.work_queue(destination)
        try:
            # A failed passive declare closes its channel: use a throwaway one.
            async with self._connection.channel() as probe:
                await probe.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity as e:
            raise UnroutableError(
                f"destination {destination!r} has no work queue ({queue!r}): start a "
                f"worker ('rmqdelay consume {destination}') or declare it "
                f"('rmqdelay declare {destination}') first",
                destination=destination,
            ) from e
        except RuntimeError as e:
            # aio-pika's word for a connection that is down or closed while a channel
            # opened ("Connection was not opened", "<Connection ...> closed"): retryable.
            raise AMQPConnectionError(f"the connection to the broker is down: {e}") from e

    def _require_channel(self) -> AbstractChannel:
        if self._channel is None:
            raise _not_started()
        return self._channel

    def _require_publisher(self) -> Publisher:
        if self._publisher is None:
            raise _not_started()
        return self._publisher


def _retry_overrides(
    max_attempts: int | None,
    backoff_base: timedelta | float | None,
    backoff_cap: timedelta | float | None,
) -> dict[str, int]:
    """Per-task retry headers, refusing values a worker could not use."""
    headers: dict[str, int] = {}
    if max_attempts is not None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InvalidTaskError(f"max_attempts must be a positive integer, got {max_attempts!r}")
        headers[MAX_ATTEMPTS] = max_attempts
    for header, name, value in (
        (BACKOFF_BASE_MS, "backoff_base", backoff_base),
        (BACKOFF_CAP_MS, "backoff_cap", backoff_cap),
    ):
        if value is not None:
            ms = -(-delay_to_us(value) // 1000)
            if ms < 1:
                raise InvalidDelayError(f"{name} must be at least 1 ms, got {value!r}")
            headers[header] = ms
    return headers


def _not_started() -> RuntimeError:
    return RuntimeError("Scheduler is not started; use 'async with Scheduler(...)' or start()")
