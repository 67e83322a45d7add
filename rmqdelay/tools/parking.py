"""Queues an operator may have to empty: the parking lot and the unroutable queue.

List what is there and why, show one message whole, send messages back to their
destination, delete one, or purge all. Messages are taken without an ack on a channel
of the tool's own and whatever the tool does not settle is given back with basic.nack:
RabbitMQ 4.3 counts a nack toward no delivery limit, where it counts a reject and a
closed channel (and 4.0-4.2 count every basic.get). These queues are created without a
limit that could drop a message however often it is looked at (``UNLIMITED_DELIVERIES``);
should the channel close first, the broker gives the rest back itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aio_pika import IncomingMessage
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from rmqdelay.broker.publisher import carried, properties
from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.errors import MessageDecodeError, RmqDelayError
from rmqdelay.core.wire import (
    ASIDE_PURGED,
    ASIDE_TAKEN,
    PARKED_AT,
    PARKED_ATTEMPTS,
    PARKED_DESTINATION,
    PARKED_ERROR,
    PARKED_REASON,
    PUBLISHER_PROPERTIES,
    decode_task,
    ms_to_datetime,
    rescheduled_headers,
)
from rmqdelay.tools.aside_log import AsideLog, message_id

log = logging.getLogger(__name__)

#: The largest consumer window AMQP allows (basic.qos takes a 16-bit count).
TAKE_WINDOW = 65_535
#: A take ends when no message has come for this long.
TAKE_IDLE_S = 2.0


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
        id=_id(message),
        destination=str(headers.get(PARKED_DESTINATION) or message.routing_key or "-"),
        reason=str(headers.get(PARKED_REASON) or _broker_reason(headers)),
        error=str(headers.get(PARKED_ERROR, "")),
        attempts=attempts if isinstance(attempts, int) else 0,
        parked_at=ms_to_datetime(at) if isinstance(at, int) else None,
        size=len(message.body),
    )


def _describe_unroutable(message: AbstractIncomingMessage) -> ParkedTask:
    headers: Mapping[str, Any] = message.headers or {}
    destination = message.routing_key or "-"
    deaths = headers.get("x-death")
    last = deaths[0] if isinstance(deaths, list) and deaths else {}
    when = last.get("time") if isinstance(last, dict) else None
    return ParkedTask(
        id=_id(message),
        destination=destination,
        reason=f"no work queue for destination {destination!r} when the task came due "
        "(deleted while it waited?), or a hop plan that matched no level",
        error="Unroutable",
        attempts=0,
        parked_at=when if isinstance(when, datetime) else None,
        size=len(message.body),
    )


def _found(
    taken: list[AbstractIncomingMessage], until: Callable[[AbstractIncomingMessage], bool] | None
) -> bool:
    return until is not None and bool(taken) and until(taken[-1])


def _id(message: AbstractIncomingMessage) -> str:
    return message_id(message.headers or {}, message.message_id)


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


@dataclass(frozen=True, slots=True)
class AsideMessage:
    """One message, whole, as ``show`` prints it."""

    task: ParkedTask
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    #: Read from the queue's log (the copy the broker made as it arrived): a RabbitMQ
    #: stream keeps no array or table headers (3.10), or only those named ``x-...`` (4.x).
    logged: bool = False

    def as_json(self) -> dict[str, Any]:
        """For printing: the payload as text when it is, else base64."""
        try:
            payload: dict[str, Any] = {"payload": self.body.decode()}
        except UnicodeDecodeError:
            payload = {"payload_base64": base64.b64encode(self.body).decode()}
        return {
            **self.task.as_json(),
            "content_type": self.content_type,
            **payload,
            "headers": self.headers,
            "properties": self.properties,
        }


class AsideQueue:
    """Operations on one queue of messages set aside, through a started Scheduler's
    connection."""

    #: Who reads the messages' descriptions (their id, destination and why they are here).
    describe = staticmethod(_describe)
    #: For messages "not in" it.
    place = "the queue"

    def __init__(self, scheduler: Scheduler, queue: str, log: AsideLog | None = None) -> None:
        self.scheduler = scheduler
        self.queue = queue
        #: The queue's log, followed (by a long-running reader): ``show`` reads from it.
        self.log = log

    async def _take(
        self,
        limit: int | None = None,
        until: Callable[[AbstractIncomingMessage], bool] | None = None,
    ) -> list[AbstractIncomingMessage]:
        """Take up to ``limit`` messages (or until one satisfies ``until``) without acking
        them, on a channel of its own; hand them to ``_give_back`` when done.

        A consumer with a window as large as what is wanted takes them, not ``basic.get``
        one by one: 10,000 parked messages come in a fraction of a second that way, and in
        seconds the other. Beyond the largest window AMQP allows, ``basic.get`` takes the
        rest (it ignores the window).
        """
        channel = await self.scheduler.connection.channel()
        try:
            queue = await channel.declare_queue(self.queue, passive=True)
            ready = int(queue.declaration_result.message_count or 0)
            want = ready if limit is None else min(limit, ready)
            taken: list[AbstractIncomingMessage] = []
            if want:
                await self._consume(channel, queue, want, until, taken)
            while (limit is None or len(taken) < limit) and not _found(taken, until):
                if len(taken) < min(want, TAKE_WINDOW):
                    break  # the count was stale (another tool took some): all there is
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(message)
        except BaseException:
            await channel.close()
            raise
        if not taken:
            await channel.close()
        return taken

    @staticmethod
    async def _consume(
        channel: AbstractChannel,
        queue: AbstractQueue,
        want: int,
        until: Callable[[AbstractIncomingMessage], bool] | None,
        taken: list[AbstractIncomingMessage],
    ) -> None:
        await channel.set_qos(prefetch_count=min(want, TAKE_WINDOW))
        enough, arrived = asyncio.Event(), asyncio.Event()

        async def on_message(message: AbstractIncomingMessage) -> None:
            taken.append(message)
            arrived.set()
            if len(taken) >= min(want, TAKE_WINDOW) or (until is not None and until(message)):
                enough.set()

        tag = await queue.consume(on_message, no_ack=False)
        try:
            while not enough.is_set():
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), TAKE_IDLE_S)
                except TimeoutError:
                    break  # fewer than counted: another tool took some meanwhile
        finally:
            await queue.cancel(tag)

    @staticmethod
    async def _give_back(taken: list[AbstractIncomingMessage]) -> None:
        """Return every message of ``taken`` not settled (one nack for all), then close
        their channel."""
        if not taken:
            return
        unsettled = [m for m in taken if not m.processed]
        try:
            if unsettled and not taken[0].channel.is_closed:
                await unsettled[-1].nack(requeue=True, multiple=True)
        finally:
            await taken[0].channel.close()

    async def peek(self, limit: int = 100) -> list[ParkedTask]:
        """Up to ``limit`` messages, oldest first; nothing is consumed."""
        taken = await self._take(limit)
        await self._give_back(taken)
        return [self.describe(m) for m in taken]

    async def requeue(self, ids: Collection[str] | None) -> tuple[int, list[str]]:
        """Send tasks (all when ``ids`` is None) to their destination now, attempt 1.

        Returns how many were sent and the ids that stayed, with why.
        """
        taken = await self._take()
        described = [(message, self.describe(message)) for message in taken]
        sent, sent_ids, stayed = 0, set[str](), list[str]()
        try:
            for message, parked in described:
                if ids is not None and parked.id not in ids:
                    continue
                try:
                    await self._send_back(message, parked)
                except MessageDecodeError as e:
                    # As the worker said when it parked it: the same words for one problem.
                    stayed.append(f"{parked.id}: undecodable: {e}")
                    continue
                except RmqDelayError as e:
                    stayed.append(f"{parked.id}: {e}")
                    continue
                await message.ack()
                sent += 1
                sent_ids.add(parked.id)
        finally:
            await self._give_back(taken)
            await self._note({ASIDE_TAKEN: 1}, sent_ids)
        missing = set(ids or ()) - {parked.id for _, parked in described}
        stayed += [f"{task_id}: not in {self.place}" for task_id in sorted(missing)]
        return sent, stayed

    async def _send_back(self, message: AbstractIncomingMessage, parked: ParkedTask) -> None:
        """Publish the message to its destination, due now, attempt 1: its body,
        properties and headers as they were (a forwarded message's routing key, a reply-to),
        less the parking lot's and the levels' bookkeeping."""
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
        # Sent to a destination without a queue, it would land in the unroutable queue
        # unseen (the work exchange's alternate catches it before mandatory can).
        await self.scheduler.require_destination(destination)
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
            what=f"the task {parked.id} for {destination!r}",
        )

    async def show(self, task_id: str) -> AsideMessage | None:
        """The first message with id ``task_id``, whole; nothing is consumed. From the
        queue's log when it has one that accounts for the queue, else by taking the queue
        up to the message."""
        if self.log is not None:
            connection = self.scheduler.connection
            copy = await self.log.find(connection, task_id, await self.count())
            if copy is not None:
                return self._whole(IncomingMessage(copy, no_ack=True), logged=True)
        taken = await self._take(until=lambda m: _id(m) == task_id)
        try:
            for message in taken:
                if _id(message) == task_id:
                    return self._whole(message, logged=False)
            return None
        finally:
            await self._give_back(taken)

    def _whole(self, message: AbstractIncomingMessage, *, logged: bool) -> AsideMessage:
        return AsideMessage(
            self.describe(message),
            message.body,
            message.content_type,
            dict(message.headers or {}),
            {
                name: value
                for name in PUBLISHER_PROPERTIES
                if (value := getattr(message.properties, name)) is not None
            },
            logged,
        )

    async def _note(self, headers: dict[str, Any], ids: Collection[str] = ()) -> None:
        """Append to the queue's log what a tool took out, so a reader of the log keeps
        accounting for the queue. Best effort: a record that does not get there leaves the
        log short of the queue, and its readers then take the queue instead."""
        if ASIDE_PURGED not in headers and not ids:
            return
        try:
            await self.scheduler.publisher.publish(
                json.dumps(sorted(ids)).encode(),
                properties(headers, content_type="application/json"),
                "",
                self.scheduler.wiring.names.aside_log(self.queue),
                mandatory=False,
                what=f"a record in the log of {self.queue}",
            )
        except RmqDelayError as e:
            log.warning("could not append to the log of %s (%s)", self.queue, e)

    async def delete(self, task_id: str) -> int:
        """Delete the messages with id ``task_id`` (a task parked twice is there twice);
        returns how many. The others stay."""
        taken = await self._take()
        deleted = 0
        try:
            for message in taken:
                if _id(message) == task_id:
                    await message.ack()
                    deleted += 1
        finally:
            await self._give_back(taken)
            if deleted:
                await self._note({ASIDE_TAKEN: 1}, [task_id])
        return deleted

    async def purge(self) -> int:
        """Delete every message; returns how many."""
        channel = await self.scheduler.connection.channel()
        async with channel:
            queue = await channel.get_queue(self.queue, ensure=False)
            result = await queue.purge()
        await self._note({ASIDE_PURGED: 1})
        return int(result.message_count or 0)

    async def count(self) -> int:
        """How many messages there are."""
        channel = await self.scheduler.connection.channel()
        async with channel:
            queue = await channel.declare_queue(self.queue, passive=True)
        return int(queue.declaration_result.message_count or 0)


class ParkingLot(AsideQueue):
    """The namespace's parking lot: tasks that failed, or could not be decoded."""

    place = "the parking lot"

    def __init__(self, scheduler: Scheduler, log: AsideLog | None = None) -> None:
        super().__init__(scheduler, scheduler.wiring.names.parked, log)


class UnroutableQueue(AsideQueue):
    """The namespace's unroutable queue: tasks that came due for a destination without a
    work queue (or with a hop plan no level matched)."""

    describe = staticmethod(_describe_unroutable)
    place = "the unroutable queue"

    def __init__(self, scheduler: Scheduler, log: AsideLog | None = None) -> None:
        super().__init__(scheduler, scheduler.wiring.names.unroutable, log)
