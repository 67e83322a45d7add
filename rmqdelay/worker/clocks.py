"""What a worker can tell of its publishers' clocks from the stamps on their tasks.

rmqdelay reads a due time on two clocks: the publisher's, when ``schedule()`` stamps it
(its clock plus the delay), and the worker's, which never starts a task before it. No task
arrives before it was sent, so a publish stamp ahead of the worker's clock says the
publisher's clock runs ahead (its tasks run late by as much). A clock behind cannot be
told from a task that waited in a backlog: it shows only as lateness.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from rmqdelay.core.wire import PUBLISHED_MS, TASK_ID

log = logging.getLogger(__name__)

#: A task stamped as published this far ahead of the worker's clock says the clocks
#: disagree: no task arrives before it was sent.
SKEW_WARN_MS = 1000.0
#: Said at most this often (a skewed publisher stamps every one of its tasks).
SKEW_REPORT_EVERY_MS = 60_000.0


class SkewReport:
    """Tasks stamped by a publisher whose clock runs ahead of this worker's: said at once,
    then at most once a minute, with the largest lead seen."""

    __slots__ = ("_count", "_largest_ms", "_next_ms")

    def __init__(self) -> None:
        self._count = 0
        self._largest_ms = 0.0
        self._next_ms = 0.0

    def check(self, headers: Mapping[str, Any] | None, now_ms: float) -> None:
        """Note a delivery's publish stamp if it is ahead of ``now_ms`` (the worker's clock
        on arrival) by more than SKEW_WARN_MS."""
        published = headers.get(PUBLISHED_MS) if headers else None
        if isinstance(published, int) and published - now_ms > SKEW_WARN_MS:
            assert headers is not None
            self._saw(published - now_ms, str(headers.get(TASK_ID)), now_ms)

    def _saw(self, ahead_ms: float, task_id: str, now_ms: float) -> None:
        self._count += 1
        self._largest_ms = max(self._largest_ms, ahead_ms)
        if now_ms < self._next_ms:
            return
        log.warning(
            "%d task(s) (the last %s) carried a publish stamp up to %.1f s ahead of this "
            "worker's clock: the publisher's clock runs ahead, and its tasks run that much "
            "late. rmqdelay's due times are read on the publisher's clock when scheduled and "
            "on the worker's when run: keep both synchronised (NTP)",
            self._count, task_id, self._largest_ms / 1000,
        )  # fmt: skip
        self._count, self._largest_ms = 0, 0.0
        self._next_ms = now_ms + SKEW_REPORT_EVERY_MS
