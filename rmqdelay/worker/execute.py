"""Executing one delivered task: decode it, check its cancellation, run the handler.

Nothing here acks or publishes: the result says what happened, and ``settle.py`` acts on
it. Nothing a handler does other than return (any exception, ``SystemExit``,
``KeyboardInterrupt``, its own ``CancelledError``) escapes: it is a ``Failed`` result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import HandlerTimeoutError, MessageDecodeError, RmqDelayError
from rmqdelay.core.recurrence import SERIES
from rmqdelay.core.retry import Retry
from rmqdelay.core.task import Handler, Task
from rmqdelay.core.wire import DUE_MS, PAST_DUE_TOLERANCE_MS, PUBLISHED_MS, decode_task
from rmqdelay.worker.delivery import Delivery
from rmqdelay.worker.handler import describe_failure, prepare
from rmqdelay.worker.metrics import WorkerMetrics
from rmqdelay.worker.series import SeriesKeeper
from rmqdelay.worker.threads import DaemonThreadPool

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Executed:
    """The handler returned."""

    #: Seconds from the due time (or, for a task scheduled past due, its publish time) to
    #: the start of execution.
    lateness_s: float
    past_due: bool


@dataclass(slots=True)
class Cancelled:
    """A cancel published after the task covers it: not run."""

    key: str


@dataclass(slots=True)
class Undecodable:
    """The message is not a task this worker can run."""

    error: MessageDecodeError


@dataclass(slots=True)
class Skipped:
    """An occurrence of a series missed during downtime, passed over (catch-up ``skip``);
    the next one is scheduled."""


#: A due time this long before the publish time is accepted (``at=`` in the past runs a
#: task now) but rather a mistake than a wish: said at WARNING, not only counted.
ODD_PAST_DUE_MS = 86_400_000


@dataclass(slots=True)
class Deferred:
    """Not run: the next occurrence of its series could not be published. Requeued."""

    error: str


@dataclass(slots=True)
class Failed:
    """The handler did not return: ``error`` is its type name, ``delay`` a Retry's wish."""

    task: Task
    error: str
    detail: str
    delay: timedelta | float | None


#: (Mutable dataclasses: a frozen one costs a setattr call per field, on every task.)
Result = Executed | Cancelled | Undecodable | Failed | Skipped | Deferred


class Execution:
    """Runs tasks with one handler; plain handlers run in ``threads``."""

    def __init__(
        self,
        handler: Handler,
        *,
        accept: Collection[str],
        raw: bool = False,
        timeout: timedelta | None,
        consumer_timeout: timedelta,
        cancels: CancelSet,
        threads: DaemonThreadPool,
        metrics: WorkerMetrics,
    ) -> None:
        self._call = prepare(handler, threads)
        self._accept = frozenset(accept)
        self._raw = raw
        self._timeout_s = timeout.total_seconds() if timeout is not None else None
        self.consumer_timeout_s = consumer_timeout.total_seconds()
        #: A handler is stopped this long after its delivery arrived: early enough that its
        #: task is retried (or parked) and acked before the broker takes it back.
        self.stop_after_s = self.consumer_timeout_s - settle_margin_s(self.consumer_timeout_s)
        #: Deliveries whose handler runs now, oldest first (``overrunning`` reads them).
        self._executing: dict[Delivery, Task] = {}
        self._cancels = cancels
        #: Extends recurring series; set once the worker's publisher exists.
        self.series: SeriesKeeper | None = None
        self._metrics = metrics
        #: Handlers running now (the in-flight gauge reads it when scraped).
        self.running = 0
        metrics.in_flight.set_function(lambda: self.running)

    async def run(self, message: Delivery) -> Result:
        """Decode, check cancellation and run ``message``'s task.

        Raises:
            asyncio.CancelledError: only when the worker itself cancels (it is stopping).
        """
        headers = message.headers
        try:
            task = decode_task(
                headers=headers,
                body=message.body,
                content_type=message.content_type,
                routing_key=message.routing_key or "",
                redelivered=bool(message.redelivered),
                accept=self._accept,
                raw=self._raw,
                properties=message.publisher_properties(),
            )
        except MessageDecodeError as e:
            return Undecodable(e)
        # decode_task checked that both stamps are there, as integers.
        assert headers is not None
        due_ms, published_ms = cast(int, headers[DUE_MS]), cast(int, headers[PUBLISHED_MS])
        cancelled_by = self._cancels.cancelled_by((task.id, *task.keys), published_ms)
        if cancelled_by is not None:
            return Cancelled(cancelled_by)
        if SERIES in headers and (instead := await self._advance_series(message, task)):
            return instead
        now_ms = time.time() * 1000
        past_due = published_ms - due_ms > PAST_DUE_TOLERANCE_MS
        if published_ms - due_ms > ODD_PAST_DUE_MS:
            log.warning(
                "task %s was published with a due time %.1f days before its publish time: it "
                "runs now, as asked; was the due time meant in another unit or time zone?",
                task.id, (published_ms - due_ms) / 86_400_000,
            )  # fmt: skip
        # A task scheduled with a due time long gone counts from its publish time: that
        # lateness is the user's choice, not the pipeline's.
        lateness_s = (now_ms - (published_ms if past_due else due_ms)) / 1000
        log.debug(
            "executing %s (attempt %d, %.0f ms late)", task.id, task.attempt, lateness_s * 1e3
        )
        metrics = self._metrics
        metrics.lateness.observe(lateness_s if lateness_s > 0 else 0.0)
        self.running += 1
        started = time.perf_counter()
        self._executing[message] = task
        # The handler's own limit, or the broker's consumer timeout less a margin if sooner.
        # (A timer per task either way: the broker's timeout always applies.)
        limit_s, mine = message.arrived + self.stop_after_s - time.monotonic(), False
        if self._timeout_s is not None and self._timeout_s <= limit_s:
            limit_s, mine = self._timeout_s, True
        try:
            await self._within_timeout(task, limit_s, mine)
        except Retry as e:
            return Failed(task, "Retry", describe_failure(e)[1], e.delay)
        except asyncio.CancelledError as e:
            if _being_cancelled():
                raise  # the worker is stopping: its task goes back to the queue
            return Failed(task, *describe_failure(e), None)
        except BaseException as e:  # no handler may stop the worker
            return Failed(task, *describe_failure(e), None)
        finally:
            self.running -= 1
            del self._executing[message]
            metrics.duration.observe(time.perf_counter() - started)
        return Executed(lateness_s, past_due)

    def overrunning(self) -> list[Task]:
        """Handlers running past the broker's consumer timeout now, each told once: their
        stop at ``stop_after_s`` did not stop them (an async handler that swallows the
        cancellation). The broker has taken their task back, and may already have given it
        to another worker."""
        now = time.monotonic()
        found = []
        for message, task in self._executing.items():
            if now - message.arrived <= self.consumer_timeout_s:
                break  # oldest first: the rest arrived later
            if not message.overran:
                message.overran = True
                found.append(task)
        return found

    async def _advance_series(self, message: Delivery, task: Task) -> Result | None:
        """Schedule the series' next occurrence; a result if this one is not to run."""
        assert self.series is not None, "the worker sets the series keeper"
        try:
            advance = await self.series.advance(message, task)
        except MessageDecodeError as e:
            return Undecodable(e)
        except RmqDelayError as e:
            return Deferred(str(e))
        if advance == "stopped":
            return Cancelled(task.keys[0] if task.keys else task.id)  # the series key
        return None if advance == "run" else Skipped()

    async def _within_timeout(self, task: Task, limit_s: float, mine: bool) -> None:
        """Run the handler for ``limit_s`` at most: the handler timeout (``mine``), or what
        is left of the broker's consumer timeout."""
        try:
            async with asyncio.timeout(limit_s) as deadline:
                await self._call(task)
        except TimeoutError as e:
            if not deadline.expired():
                raise  # the handler's own TimeoutError
            if mine:
                raise HandlerTimeoutError(f"handler ran longer than {limit_s:g}s") from e
            raise HandlerTimeoutError(
                f"handler stopped after {self.stop_after_s:g}s from the task's delivery, "
                f"before RabbitMQ's consumer timeout ({self.consumer_timeout_s:g}s, "
                "RMQDELAY_CONSUMER_TIMEOUT) takes the task back and hands it to another "
                "worker while this one still runs; raise RMQDELAY_CONSUMER_TIMEOUT for "
                "longer handlers"
            ) from e


def settle_margin_s(consumer_timeout_s: float) -> float:
    """How long before the broker's consumer timeout a handler is stopped: time to publish
    its retry and ack it (a minute, or a tenth of a short timeout)."""
    return min(60.0, consumer_timeout_s / 10)


def _being_cancelled() -> bool:
    """Whether the current task was cancelled (rather than handed a CancelledError)."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0
