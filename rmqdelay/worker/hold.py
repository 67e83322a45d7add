"""Holding early tasks: the levels deliver a task up to the hold window (by default one
resolution unit) before it is due; the worker keeps it (unacked, outside the concurrency
slots) and releases it at its due time, by the wall clock the publisher stamped it
with."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from rmqdelay.core.wire import DUE_MS, EARLIEST_MS, LATEST_MS
from rmqdelay.worker.metrics import WorkerMetrics
from rmqdelay.worker.stats import Tally

log = logging.getLogger(__name__)

#: Held beyond the hold window and one more unit (hop time, rounding): clock skew
#: between publisher and worker hosts.
MAX_HOLD_MARGIN_S = 5.0


def due_s(headers: Mapping[str, Any] | None) -> float | None:
    """The due time in epoch seconds, read before decoding (None when missing or odd, a
    time in another unit included: decoding will say what is wrong)."""
    due = headers.get(DUE_MS) if headers else None
    return due / 1000 if type(due) is int and EARLIEST_MS <= due <= LATEST_MS else None


def max_hold_s(resolution_ms: int, hold_window_s: float) -> float:
    """Longer than this before its due time, a task goes back through the levels rather
    than sitting in a worker's memory (a publisher's wrong plan or wider window, a skewed
    clock). Publishers and workers should share RMQDELAY_HOLD_WINDOW."""
    return hold_window_s + resolution_ms / 1000 + MAX_HOLD_MARGIN_S


class Holder:
    """The tasks a worker holds now; ``release_all`` hands them back at stop."""

    def __init__(self, tally: Tally, metrics: WorkerMetrics) -> None:
        self._tally = tally
        self._holding: set[asyncio.Task[None]] = set()
        # Read when scraped: nothing to update per task.
        metrics.held.set_function(lambda: len(self._holding))

    def __len__(self) -> int:
        return len(self._holding)

    async def until(self, due: float, task_id: object) -> None:
        """Return at ``due`` (epoch seconds), never before; cancelled, the task is requeued
        by the caller."""
        current = asyncio.current_task()
        assert current is not None
        self._holding.add(current)
        self._tally.held()
        log.debug("holding %s for %.0f ms until it is due", task_id, 1000 * (due - time.time()))
        try:
            # A timer may fire a hair early by the wall clock: check again.
            while (wait := due - time.time()) > 0:  # noqa: ASYNC110 - a timer, not an event
                await asyncio.sleep(wait)
        finally:
            self._holding.discard(current)

    def release_all(self) -> set[asyncio.Task[None]]:
        """Stop holding: the held tasks go back to the queue at once, not after the grace.
        Returns the tasks that held them, to await their giving back."""
        released = set(self._holding)
        for holder in released:
            holder.cancel()
        return released
