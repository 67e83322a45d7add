"""The parking lot: list what is parked and why, send it back, or purge it."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from rmqdelay.broker.publisher import carried
from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.errors import MessageDecodeError, RmqDelayError
from rmqdelay.core.wire import (
    PARKED_AT,
    PARKED_ATTEMPTS,
    PARKED_DESTINATION,
    PARKED_ERROR,
    PARKED_REASON,
    TASK_ID,
    decode_task,
    ms_to_datetime,
    rescheduled_headers,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ParkedTask:
    """One parked message, as ``rmqdelay parked`` shows it."""

    id: str
    destination: str
    reason: str
    error: str
    attempts: int
    parked_at: datetime | None
    size: int

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "id": self.id,
            "destination": self.destination,
            "reason": self.reason,
            "error": self.error,
            "attempts": self.attempts,
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
            "size": self.size,
        }


def _describe(message: AbstractIncomingMessage) -> ParkedTask:
    headers: Mapping[str, Any] = message.headers or {}
    at = headers.get(PARKED_AT)
    attempts = headers.get(PARKED_ATTEMPTS)
    return ParkedTask(
        id=str(headers.get(TASK_ID) or message.message_id or "-"),
        destination=str(headers.get(PARKED_DESTINATION) or message.routing_key or "-"),
        reason=str(headers.get(PARKED_REASON) or _broker_reason(headers)),
        error=str(headers.get(PARKED_ERROR, "")),
        attempts=attempts if isinstance(attempts, int) else 0,
        parked_at=ms_to_datetime(at) if isinstance(at, int) else None,
        size=len(message.body),
    )


def _broker_reason(headers: Mapping[str, Any]) -> str:
    """Why the broker itself dead-lettered a message here (e.g. the work queues' delivery
    limit after workers died holding it), from the headers it adds."""
    why, queue = headers.get("x-first-death-reason"), headers.get("x-first-death-queue")
    if why is None:
        return "(no reason recorded)"
    detail = (
        " (delivered to workers that all died or gave it back)" if why == "delivery_limit" else ""
    )
    return f"dead-lettered by the broker from {queue}: {why}{detail}"


class ParkingLot:
    """Operations on a namespace's parking lot, through a started Scheduler's connection."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.queue = scheduler.wiring.names.parked

    async def _take(self, limit: int | None = None) -> list[AbstractIncomingMessage]:
        """Get up to ``limit`` parked messages without acking them (on a channel of its own:
        closing it puts every one not acked back)."""
        channel = await self.scheduler.connection.channel()
        queue = await channel.get_queue(self.queue, ensure=False)
        taken: list[AbstractIncomingMessage] = []
        while limit is None or len(taken) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(message)
        return taken

    async def peek(self, limit: int = 100) -> list[ParkedTask]:
        """Up to ``limit`` parked tasks, oldest first; nothing is consumed."""
        taken = await self._take(limit)
        if taken:
            await taken[0].channel.close()
        return [_describe(m) for m in taken]

    async def requeue(self, ids: Collection[str] | None) -> tuple[int, list[str]]:
        """Send parked tasks (all when ``ids`` is None) to their destination now, attempt 1.

        Returns how many were sent and the ids that stayed parked, with why.
        """
        taken = await self._take()
        described = [(message, _describe(message)) for message in taken]
        sent, stayed = 0, []
        try:
            for message, parked in described:
                if ids is not None and parked.id not in ids:
                    continue
                try:
                    await self._send_back(message, parked)
                except (MessageDecodeError, RmqDelayError) as e:
                    stayed.append(f"{parked.id}: {e}")
                    continue
                await message.ack()
                sent += 1
        finally:
            if taken:
                await taken[0].channel.close()
        missing = set(ids or ()) - {parked.id for _, parked in described}
        stayed += [f"{task_id}: not in the parking lot" for task_id in sorted(missing)]
        return sent, stayed

    async def _send_back(self, message: AbstractIncomingMessage, parked: ParkedTask) -> None:
        """Publish the parked message to its destination, due now, attempt 1: its body,
        properties and headers as they were (a forwarded message's routing key, a reply-to),
        less the parking lot's."""
        headers = message.headers or {}
        # Its headers must still make a task (the body is the worker's business: a message
        # parked as undecodable is parked again, with the reason).
        decode_task(
            headers=headers,
            body=message.body,
            content_type=message.content_type,
            routing_key=parked.destination,
            raw=True,
        )
        wiring = self.scheduler.wiring
        destination = wiring.names.check_destination(parked.destination)
        way = wiring.route(0, parked.id)
        again = rescheduled_headers(
            headers, attempt=1, due_ms=time.time_ns() // 1_000_000, route=way.headers
        )
        await self.scheduler.publisher.publish(
            message.body,
            carried(message.properties, again),
            way.exchange,
            destination,
            mandatory=way.mandatory,
            what=f"the parked task {parked.id} for {destination!r}",
        )

    async def purge(self) -> int:
        """Delete every parked message; returns how many."""
        channel = await self.scheduler.connection.channel()
        async with channel:
            queue = await channel.get_queue(self.queue, ensure=False)
            result = await queue.purge()
        return int(result.message_count or 0)

    async def count(self) -> int:
        """How many messages are parked."""
        channel = await self.scheduler.connection.channel()
        async with channel:
            queue = await channel.declare_queue(self.queue, passive=True)
        return int(queue.declaration_result.message_count or 0)
