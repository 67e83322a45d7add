"""Settling a failed or misplaced delivery: requeue it, or replace it by a confirmed copy
(a retry, a task sent back through the levels or given back at stop, a parked task) and
then ack it. (A task that ran, or was cancelled, is simply acked by the worker.)

Every replacement goes through the one ``Publisher``; a replacement that cannot be
published returns the delivery to the queue, so nothing is lost.

A quorum work queue counts returns toward its delivery limit, and each RabbitMQ version
counts other ones: 3.x and 4.0-4.2 every return, 4.3 a reject or a lost channel but not a
nack. So a task the worker holds or queues but does not run because it is stopping goes
back as a fresh copy (``give_back``), which no version counts; what returns because
something failed, or because its handler was cut off at stop (part of it may have run:
it must come back as a redelivery), goes back with basic.reject (``requeue``), which
every version counts. The limit then means the same everywhere: deliveries whose
handler started and did not finish, above all in workers that died or lost their link.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta

from pamqp.commands import Basic

from rmqdelay.broker import tracing
from rmqdelay.broker.cancels import publish_cancel
from rmqdelay.broker.publisher import Publisher, carried
from rmqdelay.core.errors import InvalidDelayError, PublishNotConfirmedError
from rmqdelay.core.redact import Redactor
from rmqdelay.core.retry import RetryPolicy, decide
from rmqdelay.core.task import Task
from rmqdelay.core.wire import ATTEMPT, TASK_ID, parked_headers, rescheduled_headers
from rmqdelay.core.wiring import Wiring
from rmqdelay.worker.delivery import Delivery
from rmqdelay.worker.hold import due_s
from rmqdelay.worker.stats import Tally

log = logging.getLogger(__name__)


class Settler:
    """Settles the deliveries of one destination's consumer."""

    def __init__(
        self,
        wiring: Wiring,
        destination: str,
        publisher: Publisher,
        retry: RetryPolicy,
        tally: Tally,
        redact: Redactor | None = None,
    ) -> None:
        self._wiring = wiring
        self._destination = destination
        self._publisher = publisher
        self._retry = retry
        self._tally = tally
        #: What a parked reason must not show (a handler's exception text may hold the
        #: broker URL, a webhook's token...): the rules of the logs.
        self._redact = redact if redact is not None else Redactor()

    async def cancel_copies(self, message: Delivery) -> None:
        """Cancel, by its id, every copy of ``message``'s task published before now: a
        task that ran to success after the broker took it back (its consumer timeout) must
        not run again from the copy in the queue."""
        task_id = (message.headers or {}).get(TASK_ID)
        if isinstance(task_id, str):
            now_ms = time.time_ns() // 1_000_000
            await publish_cancel(self._publisher, self._wiring.names, task_id, now_ms, None)

    async def requeue(self, message: Delivery) -> None:
        """Return the delivery to the queue, counted toward its delivery limit (a publish
        failed, or a task could not run for now)."""
        self._tally.count("requeued")
        if not message.channel.is_closed:
            await message.reject(requeue=True)

    async def give_back(self, message: Delivery) -> None:
        """Hand back a task the worker will not run because it is stopping, due as it
        was: a fresh copy, confirmed, then an ack, so that holding a task and stopping
        never counts toward its delivery limit. If the copy cannot be published the
        delivery is returned as ``requeue`` does."""
        if message.channel.is_closed:
            self._tally.count("requeued")
            return  # the broker has it back already
        due = due_s(message.headers)
        try:
            await self._send(message, time.time() if due is None else due, what="give back")
        except PublishNotConfirmedError as e:
            log.warning("%s", e)  # returned (and counted) by requeue
            return
        self._tally.count("requeued")

    async def retry_or_park(
        self,
        message: Delivery,
        task: Task,
        error: str,
        detail: str,
        delay: timedelta | float | None,
    ) -> None:
        """After a failed attempt: retry through the delay levels, or park the task after
        its last attempt (the decision is ``core.retry.decide``)."""
        self._tally.count("failed")
        policy = self._retry.for_task(task.headers)
        decision = decide(
            policy, task.attempt, error, detail, delay, self._wiring.limits, random.random()
        )
        if decision.park:
            log.warning(
                "task %s failed on its last attempt (%d): %s: %s; parking it",
                task.id, task.attempt, decision.error, decision.detail,
            )  # fmt: skip
            reason = decision.reason(task.attempt, policy.max_attempts)
            await self.park(message, reason, error=decision.error, attempts=task.attempt)
            return
        wait_us = decision.wait_us
        log.info(
            "task %s failed (attempt %d of %d): %s: %s; retrying in %.3fs",
            task.id, task.attempt, policy.max_attempts, decision.error, decision.detail,
            wait_us / 1e6,
        )  # fmt: skip
        now_us = time.time_ns() // 1000
        with tracing.step("retry", attempt=task.attempt + 1, backoff_ms=wait_us // 1000):
            retried = await self._republish(
                message,
                attempt=task.attempt + 1,
                due_ms=-(-(now_us + wait_us) // 1000),
                wait_us=wait_us,
                what="retry",
            )
        if retried:
            self._tally.count("retried")

    async def send_back(self, message: Delivery, due: float) -> None:
        """A task that arrived far before its due time goes through the levels again."""
        log.info(
            "task %s arrived %.1fs before it is due; sending it back through the levels",
            (message.headers or {}).get(TASK_ID), due - time.time(),
        )  # fmt: skip
        await self._send(message, due, what="send back")

    async def _send(self, message: Delivery, due: float, *, what: str) -> None:
        """Publish the task again, due at ``due`` (epoch seconds), the same attempt."""
        attempt = (message.headers or {}).get(ATTEMPT, 1)
        await self._republish(
            message,
            attempt=attempt if type(attempt) is int else 1,
            due_ms=round(due * 1000),
            wait_us=int((due - time.time()) * 1e6),
            what=what,
        )

    async def park(self, message: Delivery, reason: str, *, error: str, attempts: int) -> None:
        """Move a delivery to the parking lot with ``reason``; requeue it if that fails."""
        # Redacted as the parked headers are: a handler's exception text may hold a secret.
        with tracing.step("park", reason=self._redact(reason), error=error, attempts=attempts):
            await self._park(message, reason, error=error, attempts=attempts)

    async def _park(self, message: Delivery, reason: str, *, error: str, attempts: int) -> None:
        parked = carried(
            message.properties,
            parked_headers(
                message.headers,
                reason=self._redact(reason),
                error=self._redact(error),
                attempts=attempts,
                destination=self._destination,
                now_ms=time.time_ns() // 1_000_000,
                source=self._wiring.names.work_queue(self._destination),
            ),
        )
        await self._replace(
            message, parked, self._wiring.names.parked, message.routing_key or "",
            what=f"parking of {message.message_id}",
        )  # fmt: skip
        self._tally.count("parked")

    async def _republish(
        self,
        message: Delivery,
        *,
        attempt: int,
        due_ms: int,
        wait_us: int,
        what: str,
    ) -> bool:
        """Send the task through the delay levels again, confirmed, then ack this copy.

        A wait the backend cannot hold (over the plugin's limit, or a due time past the
        maximum delay) parks the task with the reason rather than leaving it unsettled.
        """
        original = message.headers or {}
        task_id = original.get(TASK_ID)
        try:
            way = self._wiring.route(wait_us, task_id if isinstance(task_id, str) else "")
        except InvalidDelayError as e:
            await self.park(
                message, f"InvalidDelayError: cannot {what}: {e}", error="InvalidDelayError",
                attempts=attempt - 1,
            )  # fmt: skip
            return False
        headers = rescheduled_headers(original, attempt=attempt, due_ms=due_ms, route=way.headers)
        # The task id, also for tasks other clients published without a message id.
        message_id = message.message_id or (task_id if isinstance(task_id, str) else None)
        again = carried(message.properties, headers, message_id=message_id)
        routing_key = message.routing_key or self._destination
        await self._replace(
            message, again, way.exchange, routing_key, mandatory=way.mandatory,
            what=f"{what} of {message_id}",
        )  # fmt: skip
        return True

    async def _replace(
        self,
        message: Delivery,
        new: Basic.Properties,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool = True,
        what: str,
    ) -> None:
        """Publish ``message``'s body with properties ``new`` in its place (confirmed,
        through outages), then ack ``message``; if that fails, return it to the queue."""
        try:
            await self._publisher.publish(
                message.body, new, exchange, routing_key, mandatory=mandatory, what=what
            )
        except Exception as e:
            log.error("could not publish the %s (%s); returning it to the queue", what, e)
            await self.requeue(message)
            raise PublishNotConfirmedError(f"the {what} failed: {e}") from e
        if message.channel.is_closed:
            # The link dropped while publishing: the broker redelivers the original, which
            # may then run twice (delivery is at least once).
            return
        await message.ack()
