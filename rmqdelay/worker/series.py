"""Recurring series in the worker: an occurrence schedules the next before it runs.

The next occurrence is published (confirmed) before the handler runs and before this one
is acked, so a series survives any worker dying at any point. But an occurrence can be
taken twice: redelivered after a worker died before the ack, or doubled by the broker
(a quorum queue's at-least-once dead-lettering repeats a message after a crash). Each
taking publishes a copy of the next occurrence, so each copy then cancels every copy
published before it: its key ``<series>@<due ms>``, at its own stamp minus one. Whatever
the order, only the newest copy is not cancelled, and the series stays single. Retries
of a failed occurrence do not extend the series: the first attempt did.
"""

from __future__ import annotations

import logging
import time
from typing import Literal, cast

from rmqdelay.broker.publisher import Publisher, carried, properties
from rmqdelay.broker.scheduler import new_task_id
from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import MessageDecodeError, RmqDelayError
from rmqdelay.core.recurrence import SERIES, Step, decode_series, occurrence_key, step
from rmqdelay.core.retry import BACKOFF_BASE_MS, BACKOFF_CAP_MS, MAX_ATTEMPTS
from rmqdelay.core.task import Task
from rmqdelay.core.wire import DUE_MS, cancel_headers, strip_broker_headers, task_headers
from rmqdelay.core.wiring import Wiring
from rmqdelay.worker.delivery import Delivery

log = logging.getLogger(__name__)

#: What to do with an occurrence: run it, pass over it (missed), or drop it (series stopped).
Advance = Literal["run", "skip", "stopped"]

#: How long the cancel of older copies of an occurrence is kept after its due time.
DOUBLE_CANCEL_MARGIN_MS = 3_600_000
_OURS = "rmqdelay-"
_RETRY = (MAX_ATTEMPTS, BACKOFF_BASE_MS, BACKOFF_CAP_MS)


class SeriesKeeper:
    """Schedules the next occurrence of the series an occurrence belongs to."""

    def __init__(self, wiring: Wiring, publisher: Publisher, cancels: CancelSet) -> None:
        self._wiring = wiring
        self._publisher = publisher
        self._cancels = cancels
        self._last_stamp = 0

    async def advance(self, message: Delivery, task: Task) -> Advance:
        """Schedule the occurrence after ``task`` (confirmed), unless the series was
        stopped; say what to do with ``task``.

        A series is stopped by a cancel of its key made after the series began (not only
        after this occurrence was published): an occurrence that a worker was scheduling
        while the cancel was made is stopped too.

        Raises:
            MessageDecodeError: the series header is not one (the task is parked).
            RmqDelayError: the next occurrence could not be published (requeue the task).
        """
        try:
            series = decode_series(task.headers[SERIES])
        except RmqDelayError as e:
            raise MessageDecodeError(str(e)) from None
        if self._cancels.cancelled_by((series.key,), series.since_ms) is not None:
            return "stopped"
        if task.attempt > 1:
            return "run"
        now_ms = time.time_ns() // 1_000_000
        # The header's integer, not due_at: a float round trip can land a millisecond
        # before a cron fire time, whose "next" would then be that same time again.
        due_ms = cast(int, task.headers[DUE_MS])
        plan: Step = step(series.rule, series.catch_up, due_ms, now_ms)
        published_ms = await self._schedule_next(message, task, series.key, plan.next_due_ms)
        await self._cancel_older_copies(
            occurrence_key(series.key, plan.next_due_ms),
            published_ms - 1,
            plan.next_due_ms + DOUBLE_CANCEL_MARGIN_MS,
        )
        if plan.run:
            return "run"
        log.info(
            "series %r: skipping the occurrence due %s (missed; catch-up skip)",
            series.key,
            task.due_at.isoformat(),
        )
        return "skip"

    async def _cancel_older_copies(self, key: str, at_ms: int, until_ms: int) -> None:
        stream = self._wiring.names.cancels
        await self._publisher.publish(
            b"", properties(cancel_headers(key, at_ms, until_ms)), "", stream, what=repr(stream)
        )
        # Known here at once, not only once the stream brings it back: an older copy this
        # worker holds may come due within milliseconds (a redelivered occurrence taken
        # late), before its follower has read the record, and would run beside the new one.
        self._cancels.add(key, at_ms, time.time_ns() // 1_000_000, until_ms)

    async def _schedule_next(
        self, message: Delivery, task: Task, series_key: str, due_ms: int
    ) -> int:
        """Publish the next occurrence; returns its publish stamp."""
        now_ms = time.time_ns() // 1_000_000
        # Strictly increasing here: two copies from this worker must not tie.
        stamp = self._last_stamp = max(now_ms, self._last_stamp + 1)
        task_id = new_task_id()
        way = self._wiring.route(max(0, due_ms - now_ms) * 1000, task_id)
        original = strip_broker_headers(message.headers or {})
        # The publisher's own headers, and per-task retry settings, stay with the series.
        headers = {k: v for k, v in original.items() if not k.startswith(_OURS) or k in _RETRY}
        headers.update(
            task_headers(
                task_id,
                due_ms=due_ms,
                published_ms=stamp,
                route=way.headers,
                keys=(series_key, occurrence_key(series_key, due_ms)),
            )
        )
        headers[SERIES] = original[SERIES]
        await self._publisher.publish(
            message.body,
            carried(message.properties, headers, message_id=task_id),
            way.exchange,
            task.destination,
            mandatory=way.mandatory,
            what=f"the next occurrence of series {series_key!r}",
        )
        return stamp
