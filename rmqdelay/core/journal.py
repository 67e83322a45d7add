"""What is pending, from the journal: every task's copy as it entered the levels, less what
ran, was cancelled or was moved. Pure; no I/O.

The journal stream gets a copy of each message the schedule exchanges route (the broker
makes it: a task, a retry, a send-back, a series occurrence, an imported or rescheduled
copy). A task is pending when its newest copy is due in the future and no cancel covers
it. Past its due time a task is in its work queue, running or done: the journal cannot
tell which, and does not guess.

"Newest" is by publish stamp, then by journal offset: a retry or a send-back keeps the
stamp of the copy it continues and comes later in the journal; a rescheduled copy has a
later stamp, and its predecessor, even if sent back through the levels afterwards, stays
behind it.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import MessageDecodeError, RmqDelayError
from rmqdelay.core.recurrence import SERIES, decode_series
from rmqdelay.core.task import PendingTask, TaskPage
from rmqdelay.core.wire import (
    DUE_MS,
    JOURNAL_DESTINATION,
    JOURNALED_MS,
    PUBLISHED_MS,
    PUBLISHER_PROPERTIES,
    _identity,
    _time_header,
    _without_routing,
    keys_from_json,
    ms_to_datetime,
)

#: The header a stream adds to each record it delivers; not part of the task.
STREAM_OFFSET = "x-stream-offset"
#: Headers of a journal record that say where it is, not what the task is.
_RECORD_HEADERS = frozenset({STREAM_OFFSET, JOURNAL_DESTINATION, JOURNALED_MS})
#: Most tasks one page of ``find()`` returns.
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Entry:
    """One task copy read from the journal."""

    id: str
    destination: str
    due_ms: int
    published_ms: int
    attempt: int
    keys: tuple[str, ...]
    #: The series key and start stamp of a series occurrence (checked against its key).
    series: tuple[str, int] | None
    body: bytes = field(repr=False)
    content_type: str | None
    #: The task's headers without its route and the broker's bookkeeping.
    headers: Mapping[str, Any] = field(repr=False)
    #: The publisher's AMQP properties other than headers and content type (only those set).
    properties: Mapping[str, Any] = field(repr=False)
    offset: int = 0
    #: Payload bytes (the body may be left out: see ``whole``).
    size: int = -1
    #: False for an entry kept without body, headers and properties (a live index keeps a
    #: million of these; the whole record is read again from ``offset`` when needed).
    whole: bool = True

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", len(self.body))

    def slim(self) -> Entry:
        """This entry without body, headers and properties."""
        return dataclasses.replace(self, body=b"", headers={}, properties={}, whole=False)

    def task(self) -> PendingTask:
        """The public view of this copy."""
        return PendingTask(
            id=self.id,
            destination=self.destination,
            due_at=ms_to_datetime(self.due_ms),
            attempt=self.attempt,
            keys=self.keys,
            size=self.size,
            published_at=ms_to_datetime(self.published_ms),
            series=self.series[0] if self.series else None,
            content_type=self.content_type,
            body=self.body,
            headers=self.headers,
            properties=self.properties,
        )


def decode_entry(
    *,
    headers: Mapping[str, Any] | None,
    body: bytes,
    routing_key: str,
    content_type: str | None,
    properties: Mapping[str, Any],
    offset: int = 0,
) -> Entry:
    """A journal record as an entry; raises MessageDecodeError for one that is not a task
    (another client's message with a valid route but not our headers)."""
    headers = keys_from_json(headers or {})
    task_id, keys, attempt = _identity(headers)
    series: tuple[str, int] | None = None
    if SERIES in headers:
        try:
            header = decode_series(headers[SERIES])
        except RmqDelayError as e:
            raise MessageDecodeError(str(e)) from None
        series = (header.key, header.since_ms)
    destination = headers.get(JOURNAL_DESTINATION)
    return Entry(
        id=task_id,
        destination=destination if isinstance(destination, str) else routing_key,
        due_ms=_time_header(headers, DUE_MS),
        published_ms=_time_header(headers, PUBLISHED_MS),
        attempt=attempt,
        keys=tuple(keys),
        series=series,
        body=body,
        content_type=content_type,
        headers={k: v for k, v in _without_routing(headers).items() if k not in _RECORD_HEADERS},
        properties={k: v for k, v in properties.items() if k in PUBLISHER_PROPERTIES},
        offset=offset,
    )


def encode_cursor(due_ms: int, task_id: str) -> str:
    """Where the next page starts: after this due time and id (opaque to callers)."""
    raw = json.dumps([due_ms, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The due time and id a cursor stands for; raises ValueError naming the bad cursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        due_ms, task_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError(f"cursor {cursor[:60]!r} is not one a listing returned") from None
    if not isinstance(due_ms, int) or not isinstance(task_id, str):
        raise ValueError(f"cursor {cursor[:60]!r} is not one a listing returned")
    return due_ms, task_id


@dataclass(frozen=True, slots=True)
class Query:
    """What ``find()`` filters on; every field given must match."""

    key: str | None = None
    destination: str | None = None
    #: Due strictly before / at or after these (epoch ms).
    due_before_ms: int | None = None
    due_after_ms: int | None = None
    limit: int = 100
    cursor: str | None = None

    def matches(self, entry: Entry) -> bool:
        return (
            (self.key is None or self.key in entry.keys or self.key == entry.id)
            and (self.destination is None or entry.destination == self.destination)
            and (self.due_before_ms is None or entry.due_ms < self.due_before_ms)
            and (self.due_after_ms is None or entry.due_ms >= self.due_after_ms)
        )


class TaskIndex:
    """The newest copy of each task seen in the journal, and the cancels to judge them by.

    Queries stay fast with a million entries: a key's tasks come from a key index, and a
    page of all tasks is the ``heapq.nsmallest`` of (due, id) pairs past the cursor
    (0.15 s over 1,000,000 here), not a sort of everything (1.4 s).
    """

    def __init__(self, cancels: CancelSet | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        #: (due_ms, id) of each entry: what pages are cut from.
        self._orders: dict[str, tuple[int, str]] = {}
        #: Ids under each key (an id is its own key: looked up in ``_entries``).
        self._by_key: dict[str, set[str]] = {}
        self.cancels = cancels if cancels is not None else CancelSet(0)
        #: Records that were not tasks (counted, not kept).
        self.undecodable = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Entry) -> None:
        """Take a copy in journal order."""
        old = self._entries.get(entry.id)
        if old is not None and entry.published_ms < old.published_ms:
            return
        if old is not None:
            self._unkey(old)
        self._entries[entry.id] = entry
        self._orders[entry.id] = (entry.due_ms, entry.id)
        for key in entry.keys:
            self._by_key.setdefault(key, set()).add(entry.id)

    def _unkey(self, entry: Entry) -> None:
        for key in entry.keys:
            ids = self._by_key.get(key)
            if ids is not None:
                ids.discard(entry.id)
                if not ids:
                    del self._by_key[key]

    def prune(self, before_ms: int) -> int:
        """Forget tasks due before ``before_ms`` (a live index keeps what can be pending,
        and a little more); returns how many went."""
        gone = [e for e in self._entries.values() if e.due_ms < before_ms]
        for entry in gone:
            self._unkey(entry)
            del self._entries[entry.id], self._orders[entry.id]
        return len(gone)

    def all(self) -> Iterable[Entry]:
        """The newest copy of every task the journal has, pending or not."""
        return self._entries.values()

    def copy_of(self, task_id: str, published_ms: int) -> bool:
        """Whether the journal has a copy of ``task_id`` with this publish stamp (an
        import of it has been made already)."""
        entry = self._entries.get(task_id)
        return entry is not None and entry.published_ms >= published_ms

    def is_pending(self, entry: Entry, now_ms: int) -> bool:
        """Due in the future and not cancelled."""
        if entry.due_ms <= now_ms:
            return False
        if self.cancels.cancelled_by((entry.id, *entry.keys), entry.published_ms) is not None:
            return False
        series = entry.series
        return series is None or self.cancels.cancelled_by(series[:1], series[1]) is None

    def get(self, task_id: str, now_ms: int) -> Entry | None:
        """The pending task with this id, if there is one."""
        entry = self._entries.get(task_id)
        return entry if entry is not None and self.is_pending(entry, now_ms) else None

    def pending(self, now_ms: int, query: Query | None = None) -> list[Entry]:
        """Every pending task matching ``query``, soonest due first (then by id)."""
        query = query or Query()
        found = [
            e for e in self._candidates(query) if query.matches(e) and self.is_pending(e, now_ms)
        ]
        found.sort(key=_order)
        return found

    def _candidates(self, query: Query) -> Iterable[Entry]:
        if query.key is None:
            return self._entries.values()
        ids = set(self._by_key.get(query.key, ()))
        if query.key in self._entries:
            ids.add(query.key)
        return [self._entries[i] for i in ids]

    def find(self, now_ms: int, query: Query) -> tuple[list[Entry], str | None]:
        """One page of ``pending(query)`` after ``query.cursor``, and the cursor of the
        next page (None: this is the last)."""
        if not 1 <= query.limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1 to {MAX_PAGE}, got {query.limit!r}")
        after = decode_cursor(query.cursor) if query.cursor is not None else (now_ms, "\uffff")
        if query.key is not None:
            found = [e for e in self.pending(now_ms, query) if _order(e) > after]
        else:
            found = self._page_after(now_ms, query, after)
        page = found[: query.limit]
        more = len(found) > query.limit
        return page, encode_cursor(*_order(page[-1])) if more else None

    def _page_after(self, now_ms: int, query: Query, after: tuple[int, str]) -> list[Entry]:
        """Up to limit + 1 pending tasks after ``after``: the smallest (due, id) pairs,
        widened while cancelled or filtered-out ones leave the page short."""
        floor = max(after, (now_ms, "\uffff"))
        wanted, take = query.limit + 1, query.limit + 1
        while True:
            orders = heapq.nsmallest(take, (o for o in self._orders.values() if o > floor))
            entries = (self._entries[task_id] for _, task_id in orders)
            found = [e for e in entries if query.matches(e) and self.is_pending(e, now_ms)]
            if len(found) >= wanted or len(orders) < take:
                return found[:wanted]
            take *= 4

    def tally(
        self,
        entries: Iterable[Entry],
        now_ms: int,
        ends_ms: list[int],
        into: dict[str, list[int]],
    ) -> None:
        """Count the pending ones of ``entries`` into ``into``: per destination, how many
        are due by each of ``ends_ms`` (ascending; past the last: the extra last count)."""
        for entry in entries:
            if self.is_pending(entry, now_ms):
                counts = into.get(entry.destination)
                if counts is None:
                    counts = into[entry.destination] = [0] * (len(ends_ms) + 1)
                counts[bisect.bisect_left(ends_ms, entry.due_ms)] += 1


def _order(entry: Entry) -> tuple[int, str]:
    return entry.due_ms, entry.id


def page_of(entries: list[Entry], cursor: str | None) -> TaskPage:
    """Entries and a cursor as the public page."""
    return TaskPage([e.task() for e in entries], cursor)


# -- export lines -------------------------------------------------------------------------

Kind = Literal["task", "cancel", "series"]
#: First line of an export: what it is, so that ``import`` refuses other files.
FORMAT = "rmqdelay-export/1"


def encode_value(value: Any) -> Any:
    """An AMQP header or property value as JSON that ``decode_value`` restores exactly
    (types JSON lacks are tagged objects; every table is tagged, so no tag is ambiguous)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else {"$float": repr(value)}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, datetime):
        return {"$time": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, Mapping):
        return {"$table": {str(k): encode_value(v) for k, v in value.items()}}
    raise ValueError(f"cannot export a header value of type {type(value).__name__}: {value!r}")


def decode_value(value: Any) -> Any:
    """The inverse of ``encode_value``; raises ValueError on anything it did not write."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "$table" and isinstance(inner, dict):
            return {k: decode_value(v) for k, v in inner.items()}
        if tag == "$bytes" and isinstance(inner, str):
            return base64.b64decode(inner, validate=True)
        if tag == "$time" and isinstance(inner, str):
            return datetime.fromisoformat(inner)
        if tag == "$decimal" and isinstance(inner, str):
            return Decimal(inner)
        if tag == "$float" and isinstance(inner, str):
            return float(inner)
    raise ValueError(f"not an exported value: {json.dumps(value)[:80]}")


def task_line(entry: Entry) -> dict[str, Any]:
    """An export line for a pending task: readable fields first, then what import uses
    (headers, properties and the body, exactly)."""
    return {
        "kind": "task",
        "id": entry.id,
        "destination": entry.destination,
        "due": ms_to_datetime(entry.due_ms).isoformat(),
        "attempt": entry.attempt,
        "keys": list(entry.keys),
        "content_type": entry.content_type,
        "headers": encode_value(dict(entry.headers))["$table"],
        "properties": encode_value(dict(entry.properties))["$table"],
        "body": base64.b64encode(entry.body).decode(),
    }


def cancel_line(key: str, at_ms: int, until_ms: int) -> dict[str, Any]:
    """An export line for a live cancel."""
    return {"kind": "cancel", "key": key, "at_ms": at_ms, "until_ms": until_ms}


def series_line(record: bytes) -> dict[str, Any]:
    """An export line for a series registry record (its body, as the registry holds it)."""
    return {"kind": "series", "record": base64.b64encode(record).decode()}


@dataclass(frozen=True, slots=True)
class Imported:
    """One line of an export, read back."""

    kind: Kind
    entry: Entry | None = None
    cancel: tuple[str, int, int] | None = None
    series: bytes | None = None


def read_line(text: str, number: int) -> Imported:
    """Parse line ``number`` of an export; raises ValueError naming the line and the fault."""
    try:
        line = json.loads(text)
        kind = line["kind"]
        if kind == "task":
            headers = {k: decode_value(v) for k, v in line["headers"].items()}
            properties = {k: decode_value(v) for k, v in line["properties"].items()}
            entry = decode_entry(
                headers=headers,
                body=base64.b64decode(line["body"], validate=True),
                routing_key=line["destination"],
                content_type=line["content_type"],
                properties=properties,
            )
            return Imported("task", entry=entry)
        if kind == "cancel":
            key, at_ms, until_ms = line["key"], line["at_ms"], line["until_ms"]
            if not (isinstance(key, str) and isinstance(at_ms, int) and isinstance(until_ms, int)):
                raise ValueError("a cancel needs a string key and integer at_ms, until_ms")
            return Imported("cancel", cancel=(key, at_ms, until_ms))
        if kind == "series":
            return Imported("series", series=base64.b64decode(line["record"], validate=True))
        raise ValueError(f"unknown kind {kind!r}")
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"line {number}: not an export line (missing or wrong {e})") from None
    except (ValueError, binascii.Error, MessageDecodeError) as e:
        raise ValueError(f"line {number}: {e}") from None


# Keeping the journal -------------------------------------------------------------------
#
# The journal keeps a record for its retention, and a task can wait ten years. The keeper
# (one worker of the fleet at a time) reads the records that have lived half the
# retention, in journal order, and writes again at the end of the journal those whose task
# will still be pending when the record expires; the copy is carried again in its turn.
# A copy keeps the publish stamp, so cancels still cover it and a reader takes it for the
# same task. docs/design.md, "Keeping the journal".


@dataclass(frozen=True, slots=True)
class Keeping:
    """When the keeper reads and what it carries, for a journal retention."""

    retention_ms: int

    @property
    def every_ms(self) -> int:
        """Between passes: an eighth of the retention (1 s to 10 min), so a record is
        carried well before it can expire even when a pass is late."""
        return min(600_000, max(1000, self.retention_ms // 8))

    @property
    def lookback_ms(self) -> int:
        """How far back a new keeper looks for the last pass's progress record."""
        return 3 * self.every_ms + 60_000

    def through_ms(self, now_ms: int) -> int:
        """A pass at ``now_ms`` reads the records written before this: half the
        retention ago (the other half is the margin for late passes and skewed clocks)."""
        return now_ms - self.retention_ms // 2

    def must_carry(self, due_ms: int, journaled_ms: int) -> bool:
        """Whether a pending task's record, written at ``journaled_ms``, could expire
        before the task is due (with a quarter of the retention to spare for a publisher
        whose clock ran ahead)."""
        return due_ms > journaled_ms + self.retention_ms * 3 // 4


def journaled_ms(headers: Mapping[str, Any]) -> int | None:
    """When a record was written to the journal: a carried copy says so; any other was
    written as it was published (an imported one later, which only carries it sooner).
    None: not a task record."""
    try:
        return _time_header(headers, JOURNALED_MS if JOURNALED_MS in headers else PUBLISHED_MS)
    except MessageDecodeError:
        return None


def carried_headers(headers: Mapping[str, Any], destination: str, now_ms: int) -> dict[str, Any]:
    """The headers of a record carried forward: the same task, its destination in a header
    (the copy's routing key is the stream's name), and when the copy is written."""
    return {
        **{k: v for k, v in headers.items() if k not in _RECORD_HEADERS},
        JOURNAL_DESTINATION: destination,
        JOURNALED_MS: now_ms,
    }
