"""Holding early tasks: the levels deliver a task up to the hold window (16 s by default)
before it is due; the worker keeps it (unacked, outside the concurrency
slots) and releases it at its due time, by the wall clock the publisher stamped it
with."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from rmqdelay.core.wire import DUE_MS, EARLIEST_MS, LATEST_MS, TASK_ID
from rmqdelay.worker.delivery import Delivery
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
    """The deliveries a worker holds until they are due: a heap by due time and one timer,
    which hands each to ``release`` at its due time by the wall clock.

    A held delivery is only its message: no task, no coroutine. A worker holds every task
    due within the hold window (8,000 at 1,000 tasks/s and an 8 s window), and the garbage
    collector walks all of them: a task and its coroutines waiting per hold made 38
    tracked objects each and pauses of 50 ms; the message alone is five.
    """

    def __init__(
        self, tally: Tally, metrics: WorkerMetrics, release: Callable[[Delivery], object]
    ) -> None:
        self._tally = tally
        self._release = release
        self._heap: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()  # equal due times: first come, first released
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        # Read when scraped: nothing to update per task.
        metrics.held.set_function(lambda: len(self._heap))

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, message: Delivery, due: float) -> None:
        """Keep ``message`` until ``due`` (epoch seconds); it is released then, never before."""
        heapq.heappush(self._heap, (due, next(self._order), message))
        self._tally.held()
        if log.isEnabledFor(logging.DEBUG):
            task_id = (message.headers or {}).get(TASK_ID)
            log.debug("holding %s for %.0f ms until it is due", task_id, 1000 * (due - time.time()))
        if due < self._timer_due:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, due - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_due = None, math.inf
        # A timer may fire a hair early by the wall clock: what is not due yet waits on.
        now = time.time()
        while self._heap and self._heap[0][0] <= now:
            message = heapq.heappop(self._heap)[2]
            if message.channel.is_closed:
                # Its connection dropped while it was held: the broker has it back and
                # delivers it again, so running this copy would run it twice.
                log.debug("dropping held task %s: its channel closed", message.message_id)
                continue
            self._release(message)
        if self._heap:
            self._arm(self._heap[0][0])

    def take_all(self) -> list[Delivery]:
        """Stop holding: the held deliveries, for the caller to hand back at once rather
        than after the grace period (those whose channel closed are back already)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, math.inf
        held = [m for _, _, m in sorted(self._heap) if not m.channel.is_closed]
        self._heap.clear()
        return held
