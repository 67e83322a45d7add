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
from typing import Any, cast

from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import HandlerTimeoutError, MessageDecodeError, RmqDelayError
from rmqdelay.core.recurrence import SERIES
from rmqdelay.core.retry import Retry
from rmqdelay.core.task import Handler, Task
from rmqdelay.core.wire import DUE_MS, PAST_DUE_TOLERANCE_MS, PUBLISHED_MS, decode_task
from rmqdelay.worker.delivery import Delivery
from rmqdelay.worker.handler import describe_failure, prepare
from rmqdelay.worker.metrics import WorkerMetrics
from rmqdelay.worker.recent import RecentRuns
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
class Repeated:
    """A redelivery of a copy this worker ran already (its ack was lost): not run again."""


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
Result = Executed | Cancelled | Undecodable | Failed | Skipped | Deferred | Repeated


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
        #: Deliveries whose handler runs now, with the asyncio task running it (``enforce``
        #: stops it).
        self._executing: dict[Delivery, tuple[Task, asyncio.Task[Any]]] = {}
        self._cancels = cancels
        #: Extends recurring series; set once the worker's publisher exists.
        self.series: SeriesKeeper | None = None
        self._metrics = metrics
        #: Handlers running now (the in-flight gauge reads it when scraped).
        self.running = 0
        #: What ran lately, so that a redelivery after a lost ack is not run again.
        self.recent = RecentRuns()
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
        ran = message.ran = RecentRuns.key(task.id, published_ms, task.attempt)
        if message.redelivered and ran in self.recent:
            return Repeated()
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
        self._metrics.lateness.observe(lateness_s if lateness_s > 0 else 0.0)
        return await self._handle(message, task, Executed(lateness_s, past_due))

    def settled(self, message: Delivery) -> None:
        """``message``'s handler ran and what follows is decided (it returned, or its retry
        or parked copy is confirmed): a redelivery of it is a lost ack's, not to run again.
        Not called when a retry could not be published and the task went back to the
        queue to run again."""
        if message.ran is not None:
            self.recent.add(message.ran)

    async def _handle(self, message: Delivery, task: Task, executed: Executed) -> Result:
        """Call the handler: ``executed`` if it returns, else why it failed."""
        metrics = self._metrics
        self.running += 1
        started = time.perf_counter()
        current = asyncio.current_task()
        assert current is not None
        self._executing[message] = (task, current)
        try:
            if self._timeout_s is None:
                await self._call(task)
            else:
                await self._within_timeout(task, self._timeout_s)
        except Retry as e:
            return Failed(task, "Retry", describe_failure(e)[1], e.delay)
        except asyncio.CancelledError as e:
            if message.stopped and _uncancel(current):
                return Failed(task, *describe_failure(HandlerTimeoutError(self._why())), None)
            if _being_cancelled():
                raise  # the worker is stopping: its task goes back to the queue
            return Failed(task, *describe_failure(e), None)
        except BaseException as e:  # no handler may stop the worker
            return Failed(task, *describe_failure(e), None)
        finally:
            self.running -= 1
            del self._executing[message]
            metrics.duration.observe(time.perf_counter() - started)
        if message.stopped:
            current.uncancel()  # the handler swallowed its stop and returned
        return executed

    def enforce(self) -> list[Task]:
        """Stop the handlers whose delivery is near the broker's consumer timeout (at
        ``stop_after_s``: their task is then retried in time), and return those running
        past it, each once: their handler ignored the stop (an async one that swallows the
        cancellation). The broker has taken those tasks back and may already have given
        them to another worker.

        Called about every second rather than a timer per task: a timer costs ~5 us a task,
        and the margin before the timeout is wider than the interval."""
        now = time.monotonic()
        overran = []
        # All of them (a concurrency's worth): the order is that of the handlers' starts,
        # and a delivery that waited for a slot started after younger ones.
        for message, (task, running) in self._executing.items():
            age = now - message.arrived
            if age <= self.stop_after_s:
                continue
            if not message.stopped:
                message.stopped = True
                running.cancel()
            if age > self.consumer_timeout_s and not message.overran:
                message.overran = True
                overran.append(task)
        return overran

    def _why(self) -> str:
        return (
            f"handler stopped {self.stop_after_s:g}s after the task's delivery, before "
            f"RabbitMQ's consumer timeout ({self.consumer_timeout_s:g}s, "
            "RMQDELAY_CONSUMER_TIMEOUT) takes the task back and hands it to another worker "
            "while this one still runs; raise RMQDELAY_CONSUMER_TIMEOUT for longer handlers"
        )

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

    async def _within_timeout(self, task: Task, limit_s: float) -> None:
        try:
            async with asyncio.timeout(limit_s) as deadline:
                await self._call(task)
        except TimeoutError as e:
            if not deadline.expired():
                raise  # the handler's own TimeoutError
            raise HandlerTimeoutError(f"handler ran longer than {limit_s:g}s") from e


def settle_margin_s(consumer_timeout_s: float) -> float:
    """How long before the broker's consumer timeout a handler is stopped: time to publish
    its retry and ack it (a minute, or a tenth of a short timeout)."""
    return min(60.0, consumer_timeout_s / 10)


def _uncancel(current: asyncio.Task[object]) -> bool:
    """Take back the cancel that stopped a handler; False if the task is being cancelled
    for another reason as well (the worker is stopping)."""
    return current.uncancel() == 0


def _being_cancelled() -> bool:
    """Whether the current task was cancelled (rather than handed a CancelledError)."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0
