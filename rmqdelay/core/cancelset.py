"""Which keys were cancelled when, and how cancels and schedules are ordered. Pure; no I/O.

The rule: a task is cancelled when one of its keys (its id is always one) has a cancel
stamped at or after the task's publish stamp, and the cancel has not expired. Stamps are
integer milliseconds from the publishing host's clock; within one Scheduler they are
ordered exactly (``Stamps``).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

#: Bits of a packed entry that hold the cancel stamp (ms; enough until the year 2527).
_AT_BITS = 44
_AT_MASK = (1 << _AT_BITS) - 1
#: Expiry is kept in buckets whose width grows with the distance (1/256 of it, rounded to a
#: power of two seconds): few buckets however the untils spread (a few thousand over ten
#: years), and a key is kept at most ~0.4% of its remaining time too long, never less.
_BUCKET_FRACTION = 256


def _bucket_s(until_ms: int, now_ms: int) -> int:
    """The bucket ``until_ms`` expires in: a second at or after it."""
    until_s = -(-until_ms // 1000)
    width = max(1, (until_s - now_ms // 1000) // _BUCKET_FRACTION)
    width = 1 << (width.bit_length() - 1)  # a power of two, so neighbours share buckets
    return -(-until_s // width) * width


class CancelSet:
    """The latest cancel stamp of every key, each forgotten once its record expires.

    A record says: tasks under ``key`` published at or before ``at`` are called off, and
    none of them can still be pending after ``until`` (by default ``at`` plus the
    retention: no task waits longer than the maximum delay). Once ``until`` has passed the
    key is dropped. A key cancelled again keeps the later stamp and the later until.

    Memory is one dict entry per live key, its stamp and expiry packed in one int, plus
    one reference in an expiry bucket (a ~200-byte key costs ~250 bytes in all).
    """

    def __init__(self, retention_ms: int) -> None:
        self.retention_ms = retention_ms
        #: key -> expiry bucket (seconds) << _AT_BITS | cancel stamp (ms)
        self._entries: dict[str, int] = {}
        self._buckets: dict[int, list[str]] = {}
        self._heap: list[int] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, at_ms: int, now_ms: int, until_ms: int | None = None) -> bool:
        """Record a cancel; returns False for one that has expired already."""
        horizon = at_ms + self.retention_ms
        until_ms = horizon if until_ms is None else min(until_ms, horizon)
        if until_ms < now_ms:
            return False
        bucket = _bucket_s(until_ms, now_ms)
        old = self._entries.get(key)
        if old is not None:
            at_ms = max(at_ms, old & _AT_MASK)
            bucket = max(bucket, old >> _AT_BITS)
            if bucket == old >> _AT_BITS:
                self._entries[key] = bucket << _AT_BITS | at_ms
                return True
        self._entries[key] = bucket << _AT_BITS | at_ms
        keys = self._buckets.get(bucket)
        if keys is None:
            self._buckets[bucket] = [key]
            heapq.heappush(self._heap, bucket)
        else:
            keys.append(key)
        return True

    def cancelled_by(self, keys: Iterable[str], published_ms: int) -> str | None:
        """The first of ``keys`` cancelled at or after ``published_ms``, if any."""
        entries = self._entries
        for key in keys:
            entry = entries.get(key)
            if entry is not None and entry & _AT_MASK >= published_ms:
                return key
        return None

    def expire(self, now_ms: int) -> int:
        """Forget keys whose records have all expired; returns how many went."""
        now_s, heap, entries, forgotten = now_ms // 1000, self._heap, self._entries, 0
        while heap and heap[0] <= now_s:
            bucket = heapq.heappop(heap)
            for key in self._buckets.pop(bucket):
                entry = entries.get(key)
                # A key cancelled again since lives in a later bucket.
                if entry is not None and entry >> _AT_BITS == bucket:
                    del entries[key]
                    forgotten += 1
        return forgotten

    def items(self) -> Iterator[tuple[str, int, int]]:
        """Every live key as ``(key, at_ms, until_ms)`` (until rounded up to its bucket)."""
        for key, entry in self._entries.items():
            yield key, entry & _AT_MASK, (entry >> _AT_BITS) * 1000


class Stamps:
    """Publish and cancel stamps of one publisher, ordered as its calls were made.

    A schedule made after a cancel gets a later stamp (so the cancel does not hit it), and
    a cancel made after a schedule gets a stamp at least as late (so it does), even when
    both fall in the same millisecond or the wall clock steps back.
    """

    def __init__(self) -> None:
        self._last_publish = 0
        self._last_cancel = 0

    def publish(self, now_ms: int) -> int:
        """Stamp for a task published now."""
        stamp = max(now_ms, self._last_cancel + 1)
        self._last_publish = max(self._last_publish, stamp)
        return stamp

    def cancel(self, now_ms: int) -> int:
        """Stamp for a cancel issued now."""
        stamp = max(now_ms, self._last_publish)
        self._last_cancel = max(self._last_cancel, stamp)
        return stamp
