"""The overview's numbers, per destination: what is pending by due window (the followed
journal), what sits in its work queue and who consumes it (the broker's counts), and
what workers did in the last minutes (their stats records).

Each source is read at its own pace and cached: queue counts and worker records at most
once a second, whatever the number of browsers polling; pending counts look at every task
in the index (about a second per million), so they are recounted in the background when
they are older than ten times their last count took (at least 5 s), and a page shows them
with their age.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from aiormq.exceptions import AMQPError

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.broker.streams import ToTheEnd
from rmqdelay.core.errors import MessageDecodeError, RmqDelayError
from rmqdelay.core.pending import WINDOWS
from rmqdelay.core.wire import MARKER
from rmqdelay.core.workstats import Activity, StatsRecord, decode_record, merge
from rmqdelay.settings import Settings
from rmqdelay.tools.status import Status, collect

log = logging.getLogger(__name__)

#: The span of worker records the overview sums up.
ACTIVITY_SPAN_S = 300.0
#: The overview's columns of pending tasks: each counts those due after the one before.
WINDOW_LABELS = ("< 1 s", "1 s-1 min", "1 min-1 h", "1 h-1 day", "1 day-1 week", "later")
WINDOW_ENDS_S = [end for _, end in WINDOWS[:-1]]
assert len(WINDOW_LABELS) == len(WINDOWS)
MIN_RECOUNT_S = 5.0

T = TypeVar("T")


class Cached(Generic[T]):
    """The last value of ``fetch``, fetched again when older than ``max_age_s``; callers
    at the same time share one fetch."""

    def __init__(self, fetch: Callable[[], Awaitable[T]], max_age_s: float) -> None:
        self._fetch, self.max_age_s = fetch, max_age_s
        self._value: T | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at > self.max_age_s:
                self._value = await self._fetch()
                self._at = time.monotonic()
            return self._value


@dataclass(frozen=True, slots=True)
class PendingCounts:
    """Pending tasks per destination and window, as counted at ``at``."""

    by_destination: dict[str, list[int]]
    at: datetime
    took_s: float
    #: Why there are none (no journal), or None.
    unavailable: str | None = None


@dataclass(slots=True)
class Row:
    """One destination's line on the overview."""

    destination: str
    pending: list[int] | None = None
    ready: int | None = None
    running: int | None = None
    consumers: int | None = None
    activity: Activity = field(default_factory=Activity)

    @property
    def p50(self) -> int | None:
        return self.activity.percentile(0.5)

    @property
    def p99(self) -> int | None:
        return self.activity.percentile(0.99)


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything the overview page shows."""

    namespace: str
    rows: list[Row]
    parked: int | None
    unroutable: int | None
    pending_at: datetime | None
    pending_note: str | None
    sampled_at: str
    notes: list[str]
    warnings: list[str]

    @property
    def consumers(self) -> int:
        """Consumers of every work queue together (a worker consumes one destination)."""
        return sum(r.consumers or 0 for r in self.rows)

    @property
    def pending_age_s(self) -> float | None:
        if self.pending_at is None:
            return None
        return max(0.0, (datetime.now(UTC) - self.pending_at).total_seconds())


class OverviewSource:
    """Gathers the overview for one ``serve`` process."""

    def __init__(self, settings: Settings, scheduler: Scheduler) -> None:
        self.settings, self.scheduler = settings, scheduler
        self._status: Cached[Status] = Cached(lambda: collect(settings, []), 1.0)
        self._activity: Cached[dict[str, Activity]] = Cached(self._read_activity, 1.0)
        self._pending: PendingCounts | None = None
        self._counting: asyncio.Task[None] | None = None
        self._counted = asyncio.Event()

    def start(self) -> None:
        """Count pending tasks now, so that the first page need not wait for it."""
        self._recount()

    async def close(self) -> None:
        if self._counting is not None:
            self._counting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._counting

    async def overview(self) -> Overview:
        """The overview now (pending counts as last counted, recounted if stale)."""
        pending = await self._pending_counts()
        status, activity = await asyncio.gather(self._status.get(), self._activity.get())
        rows: dict[str, Row] = {}

        def row(name: str) -> Row:
            return rows.setdefault(name, Row(name))

        for counts in status.destinations:
            r = row(counts.name)
            r.ready, r.running, r.consumers = counts.ready, counts.unacked, counts.consumers
        for name, windows in (pending.by_destination if pending else {}).items():
            row(name).pending = windows
        for name, done in activity.items():
            row(name).activity = done
        return Overview(
            namespace=self.settings.namespace,
            rows=sorted(rows.values(), key=lambda r: r.destination),
            parked=status.parked,
            unroutable=status.unroutable,
            pending_at=pending.at if pending and pending.unavailable is None else None,
            pending_note=pending.unavailable if pending else "counting pending tasks...",
            sampled_at=status.sampled_at,
            notes=status.notes,
            warnings=status.warnings,
        )

    async def _pending_counts(self) -> PendingCounts | None:
        current = self._pending
        if current is None:
            self._recount()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):  # a page answers within a second
                    await self._counted.wait()
            return self._pending
        age = (datetime.now(UTC) - current.at).total_seconds()
        if age > max(MIN_RECOUNT_S, 10 * current.took_s) or current.unavailable is not None:
            self._recount()
        return current

    def _recount(self) -> None:
        if self._counting is None or self._counting.done():
            self._counting = asyncio.create_task(self._count())

    async def _count(self) -> None:
        started = time.monotonic()
        try:
            counts = await self.scheduler.count_pending(WINDOW_ENDS_S)
            self._pending = PendingCounts(counts, datetime.now(UTC), time.monotonic() - started)
        except RmqDelayError as e:
            self._pending = PendingCounts({}, datetime.now(UTC), 0.0, unavailable=str(e))
        except Exception:  # the page says how old the last count is; the next one retries
            log.exception("counting pending tasks failed")
        finally:
            self._counted.set()

    async def _read_activity(self) -> dict[str, Activity]:
        """Worker records of the last ``ACTIVITY_SPAN_S``, merged per destination."""
        since = datetime.now(UTC) - timedelta(seconds=ACTIVITY_SPAN_S)
        records: list[StatsRecord] = []
        try:
            async with ToTheEnd(
                self.scheduler.connection, self.settings.names.stats, since, timeout_s=5
            ) as stream:
                async for message in stream:
                    if MARKER in (message.header.properties.headers or {}):
                        continue
                    try:
                        records.append(decode_record(message.body))
                    except MessageDecodeError:
                        continue  # someone else's record: not ours to show
        except (RmqDelayError, AMQPError, ConnectionError, TimeoutError) as e:
            log.warning("could not read worker stats (%s)", e)
            return {}
        return merge(records, int(since.timestamp() * 1000))
