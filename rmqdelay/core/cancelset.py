"""Which keys were cancelled when, and how cancels and schedules are ordered. Pure; no I/O.

The rule: a task is cancelled when one of its keys (its id is always one) has a cancel
stamped at or after the task's publish stamp. Stamps are integer milliseconds from the
publishing host's clock; within one Scheduler they are ordered exactly (``Stamps``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class CancelSet:
    """The latest cancel time of every key, forgetting cancels older than the retention.

    Records arrive in stream order, which is close to time order; expiry walks that order,
    so a record stamped earlier than one ahead of it is kept a little longer, never less.
    """

    def __init__(self, retention_ms: int) -> None:
        self.retention_ms = retention_ms
        self._latest: dict[str, int] = {}
        # Two deques, not one of (at, key) tuples: a tuple per key is ~30% of the memory.
        self._arrived_at: deque[int] = deque()
        self._arrived_key: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._latest)

    def add(self, key: str, at_ms: int, now_ms: int) -> bool:
        """Record a cancel; returns False for one already past the retention horizon."""
        if at_ms < now_ms - self.retention_ms:
            return False
        if at_ms > self._latest.get(key, -1):
            self._latest[key] = at_ms
        self._arrived_at.append(at_ms)
        self._arrived_key.append(key)
        return True

    def cancelled_by(self, keys: Iterable[str], published_ms: int) -> str | None:
        """The first of ``keys`` cancelled at or after ``published_ms``, if any."""
        latest = self._latest
        for key in keys:
            at = latest.get(key)
            if at is not None and at >= published_ms:
                return key
        return None

    def expire(self, now_ms: int) -> int:
        """Forget cancels older than the retention horizon; returns how many keys went."""
        horizon, latest, forgotten = now_ms - self.retention_ms, self._latest, 0
        arrived_at, arrived_key = self._arrived_at, self._arrived_key
        while arrived_at and arrived_at[0] < horizon:
            at, key = arrived_at.popleft(), arrived_key.popleft()
            if latest.get(key) == at:
                del latest[key]
                forgotten += 1
        return forgotten


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
