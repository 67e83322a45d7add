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

    Whether a task was pending under the key is not known to the publisher: workers skip
    (and count and log) every task under it published up to ``at``, whenever it comes due.

    Attributes:
        key: The cancelled key (or task id).
        at: The cancel's stamp (UTC): tasks under ``key`` published up to it will not run.
    """

    key: str
    at: datetime


class Handler(Protocol):
    """A task handler: ``def handle(task)`` or ``async def handle(task)``.

    Returning normally acks the task; raising parks it with the reason.
    """

    def __call__(self, task: Task, /) -> Awaitable[None] | None: ...
