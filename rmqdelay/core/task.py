"""What a handler receives, and what schedule() hands back."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Task:
    """A task as a worker executes it.

    Attributes:
        id: Task id, unique per schedule() call.
        destination: Destination (work queue) the task was scheduled to.
        payload: Decoded JSON for ``application/json``, raw bytes for any other content type.
        due_at: When it was due (UTC).
        published_at: When it was scheduled (UTC, publisher's clock).
        attempt: 1 for the first execution, counting up on retries.
        keys: Cancel keys it was scheduled with (its id cancels it too).
        content_type: Content type of the body.
        headers: Every AMQP header of the delivered message.
        redelivered: True when the broker delivered it before (a worker stopped mid-task).
        body: The body exactly as published (``payload`` is its decoded form).
        properties: The AMQP properties the publisher set other than ``headers`` and
            ``content_type`` (``message_id``, ``correlation_id``, ``reply_to``,
            ``timestamp``, ...; named as pamqp names them), only those set.
    """

    id: str
    destination: str
    payload: Any
    due_at: datetime
    published_at: datetime
    attempt: int
    keys: tuple[str, ...]
    content_type: str
    headers: Mapping[str, Any] = field(repr=False)
    redelivered: bool = False
    body: bytes = field(default=b"", repr=False)
    properties: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class ScheduledTask:
    """Returned by ``Scheduler.schedule()`` once the broker has confirmed the task.

    Attributes:
        id: Task id.
        destination: Destination it will be delivered to.
        due_at: When it is due (UTC); it is never delivered before.
        hops: Delay levels the message passes through (0 when delivered at once).
        keys: Cancel keys, besides the id.
    """

    id: str
    destination: str
    due_at: datetime
    hops: int
    keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Cancellation:
    """Returned by ``Scheduler.cancel()`` once the broker has confirmed the cancel record.

    Workers skip (and count and log) every task under the key published up to ``at``,
    whenever it comes due.

    Attributes:
        key: The cancelled key (or task id).
        at: The cancel's stamp (UTC): tasks under ``key`` published up to it will not run.
        pending: How many pending tasks the journal had under the key just before the
            cancel (``cancel(key, count=True)``); None when not asked.
    """

    key: str
    at: datetime
    pending: int | None = None


@dataclass(frozen=True, slots=True)
class PendingTask:
    """A task waiting for its due time, as the journal has it (``Scheduler.get()``,
    ``find()``).

    Attributes:
        id: Task id.
        destination: Destination it will be delivered to.
        due_at: When it is due (UTC).
        attempt: 1, or the attempt a retry waits to make.
        keys: Cancel keys, besides the id.
        size: Payload size in bytes.
        published_at: Its publish stamp (UTC): cancels made after it call it off.
        series: The key of the recurring series it is an occurrence of, if any.
        content_type: Content type of the body.
        body: The payload exactly as published.
        headers: Its AMQP headers (rmqdelay's and the publisher's), without its route.
        properties: The other AMQP properties the publisher set (only those set).
    """

    id: str
    destination: str
    due_at: datetime
    attempt: int
    keys: tuple[str, ...]
    size: int
    published_at: datetime
    series: str | None = None
    content_type: str | None = None
    body: bytes = field(default=b"", repr=False)
    headers: Mapping[str, Any] = field(default_factory=dict, repr=False)
    properties: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of ``Scheduler.find()``: tasks soonest due first, and ``cursor`` to pass
    for the next page (None: this was the last)."""

    tasks: list[PendingTask]
    cursor: str | None


class Handler(Protocol):
    """A task handler: ``def handle(task)`` or ``async def handle(task)``.

    Returning normally acks the task; raising parks it with the reason.
    """

    def __call__(self, task: Task, /) -> Awaitable[None] | None: ...
