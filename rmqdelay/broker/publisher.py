"""The one way rmqdelay publishes: confirmed, retried through an outage, errors translated.

Tasks (``schedule()``), cancel records, retries, tasks sent back through the levels and
parked tasks all go through ``Publisher.publish``, so each gets the same confirm checks,
the same outage handling (until ``RMQDELAY_PUBLISH_DEADLINE``) and the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiormq.abc
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import (
    ChannelInvalidStateError,
    ChannelPreconditionFailed,
    DeliveryError,
    PublishError,
)
from pamqp.commands import Basic
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from rmqdelay.broker.alarms import Alarm, alarm_of, cleared
from rmqdelay.broker.connection import PUBLISH_RETRYABLE
from rmqdelay.core.errors import (
    BrokerBlockedError,
    BrokerUnavailableError,
    InvalidPayloadError,
    PublishNotConfirmedError,
    UnroutableError,
)
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

#: How long a publish waits for aio-pika to reopen a channel the broker closed.
REOPEN_WAIT_S = 10.0


#: Every message rmqdelay sends survives a broker restart.
PERSISTENT = 2


def properties(
    headers: dict[str, Any], *, content_type: str | None = None, message_id: str | None = None
) -> Basic.Properties:
    """The AMQP properties of a persistent message (``headers`` is taken as it is: pass a
    dict of the message's own).

    Built directly rather than through ``aio_pika.Message``, which copies and re-checks
    every field: ~13 us per task on the hot path (docs/design.md, "The hot path").
    """
    return Basic.Properties(
        content_type=content_type,
        delivery_mode=PERSISTENT,
        headers=headers,
        message_id=message_id,
    )


def carried(
    original: Basic.Properties, headers: dict[str, Any], *, message_id: str | None = None
) -> Basic.Properties:
    """``original``'s properties with new ``headers``, for a message rmqdelay publishes again
    (a retry, a send-back, the parking lot): a correlation id, reply-to, timestamp and the
    like survive the trip. Always persistent; without a per-message TTL, which in a delay
    level would dead-letter the message before its time, and without a user id, which the
    broker refuses from any other user than the one that set it."""
    return Basic.Properties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        headers=headers,
        delivery_mode=PERSISTENT,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=message_id or original.message_id,
        timestamp=original.timestamp,
        message_type=original.message_type,
        app_id=original.app_id,
    )


def restored(
    content_type: str | None, headers: dict[str, Any], publisher: Mapping[str, Any]
) -> Basic.Properties:
    """The properties of a task copy made from what the journal or an export holds: the
    publisher's own properties as they were, persistent, and without a user id (the
    broker refuses one from any other user than the one that set it)."""
    kept = {k: v for k, v in publisher.items() if k not in ("delivery_mode", "user_id")}
    return Basic.Properties(
        content_type=content_type, headers=headers, delivery_mode=PERSISTENT, **kept
    )


class Publisher:
    """Publishes on one confirming channel (aio-pika's robust channel reopens it)."""

    def __init__(self, settings: Settings, channel: AbstractChannel) -> None:
        self.settings = settings
        self.channel = channel
        #: When publishes began to fail (None: they work). Every publish under way in an
        #: outage retries: one warning for all of them, and one line when they work again.
        self._failing_since: float | None = None

    async def publish(
        self,
        body: bytes,
        props: Basic.Properties,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool = True,
        what: str = "the message",
    ) -> None:
        """Publish and wait for the confirm, retrying through an outage until the deadline.

        One copy per link: a publish is sent again only when the broker refused it (a
        nack: nothing was stored) or when the link that carried it has gone (aio-pika
        reopens it, or fails over to the next node). A copy written to a link that only
        went quiet (a cut network) arrives whenever the link does, so a second copy on it
        would be stored too; the confirm is waited for instead, until the deadline. A copy
        sent again after its link went may still have been stored: delivery is at least
        once.

        Raises:
            UnroutableError: a mandatory publish that the broker could not route.
            PublishNotConfirmedError: the broker nacked it.
            InvalidPayloadError: the broker refused it as too large.
            BrokerBlockedError: a resource alarm blocked publishing until the deadline.
            BrokerUnavailableError: no confirm before the deadline.
        """
        deadline = self.settings.publish_deadline.total_seconds()
        ends = time.monotonic() + deadline
        try:
            await self._publish_once(body, props, exchange, routing_key, mandatory, what, ends)
            if self._failing_since is not None:
                self._working_again()
            return  # the usual case: no retry machinery on the hot path
        except _RETRYABLE as e:
            self._failed(1, e)
            # Whether an attempt went out unconfirmed: the broker may yet store it.
            written = not isinstance(e, _Blocked)
            # The broker's last refusal: the last attempt may only have run out of time.
            refused = e if isinstance(e, _Nacked) else None

        def failed(state: RetryCallState) -> None:
            nonlocal written, refused
            error = state.outcome.exception() if state.outcome else None
            written = written or not isinstance(error, _Blocked)
            refused = error if isinstance(error, _Nacked) else refused
            self._failed(state.attempt_number + 1, error)

        retrying = until_deadline(ends - time.monotonic(), _RETRYABLE, before_sleep=failed)
        try:
            async for attempt in retrying:
                with attempt:
                    await self._publish_once(
                        body, props, exchange, routing_key, mandatory, what, ends
                    )
            self._working_again()
        except _RETRYABLE as e:
            if isinstance(e, _Nacked) or (refused is not None and isinstance(e, TimeoutError)):
                raise PublishNotConfirmedError(
                    f"the broker refused {what} (nack) until RMQDELAY_PUBLISH_DEADLINE "
                    f"({deadline:g}s) ran out: {refused or e}; a queue on its way has no "
                    "leader or is full"
                ) from e
            written = written or not isinstance(e, _Blocked)
            alarm = e.alarm if isinstance(e, _Blocked) else await self.alarm()
            if alarm is not None:
                raise BrokerBlockedError(
                    f"could not publish {what} within RMQDELAY_PUBLISH_DEADLINE "
                    f"({deadline:g}s): the broker at {self.settings.safe_url} blocks "
                    f"publishing, {alarm.describe()}; "
                    + (
                        # The broker only says so once a connection publishes: the first
                        # publish of an alarm is written before the client can know.
                        "it was sent before the broker said so, and was not confirmed: it "
                        "may still be stored when the alarm clears"
                        if written
                        else "nothing was sent"
                    ),
                    alarm=alarm.reason,
                    sent=written,
                ) from e
            raise BrokerUnavailableError(
                f"could not publish {what} within RMQDELAY_PUBLISH_DEADLINE ({deadline:g}s): "
                f"the broker at {self.settings.safe_url} is unreachable "
                f"({e or type(e).__name__}); nothing was confirmed"
            ) from e

    async def alarm(self) -> Alarm | None:
        """The resource alarm blocking this publisher's connection now, if any."""
        if self.channel.is_closed:
            return None
        channel = await self.channel.get_underlay_channel()
        return alarm_of(channel.connection)

    def _failed(self, attempt: int, error: BaseException | None) -> None:
        """A publish attempt failed: said once an outage, the rest at debug."""
        detail = str(error) or type(error).__name__
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "publishing fails (%s); retrying each publish until RMQDELAY_PUBLISH_DEADLINE "
                "(%gs)", detail, self.settings.publish_deadline.total_seconds(),
            )  # fmt: skip
        else:
            log.debug("publish failed (attempt %d): %s; retrying", attempt, detail)

    def _working_again(self) -> None:
        if self._failing_since is not None:
            log.info("publishing works again after %.1fs", time.monotonic() - self._failing_since)
            self._failing_since = None

    async def _open_channel(self, what: str, ends: float) -> aiormq.abc.AbstractChannel:
        """The channel to publish on, once no resource alarm blocks it (until ``ends``)."""
        if self.channel.is_closed:  # as aio-pika checks: the robust channel may be reopening
            raise ChannelInvalidStateError(f"the channel for {what} is closed")
        channel = await self.channel.get_underlay_channel()
        if (alarm := alarm_of(channel.connection)) is not None:
            # Blocked: a publish written now would wait unconfirmed until the alarm clears,
            # and might be stored after this call has given up. Send nothing until then.
            if not await cleared(channel.connection, ends - time.monotonic()):
                raise _Blocked(alarm)
        return channel

    async def _publish_once(
        self,
        body: bytes,
        props: Basic.Properties,
        exchange: str,
        routing_key: str,
        mandatory: bool,
        what: str,
        ends: float,
    ) -> None:
        """One attempt, given until ``ends`` (time.monotonic()) at most."""
        channel = await self._open_channel(what, ends)
        try:
            confirm = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=props,
                mandatory=mandatory,
                # The whole deadline: see publish() on why not a shorter attempt.
                timeout=max(0.001, ends - time.monotonic()),
            )
        except PublishError as e:
            raise UnroutableError(
                f"the broker returned {what} as unroutable ({e}); are the hop-plan headers and "
                f"the topology of namespace {self.settings.namespace!r} intact?",
                destination=routing_key,
            ) from e
        except DeliveryError as e:
            if isinstance(e.frame, Basic.Nack):
                raise _Nacked(f"the broker nacked {what}") from e
            raise PublishNotConfirmedError(f"the broker did not confirm {what}: {e!r}") from e
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise  # the caller cancelled: nothing to retry
            # aiormq cancels a publish's confirm when it gives a silent link up (its reader
            # is cancelled): the link went, not the caller. Sent again on the new link.
            raise _LinkLost(f"the link carrying {what} was given up before its confirm") from None
        except ChannelPreconditionFailed as e:
            # The broker refused the message (over its max_message_size) by closing the
            # channel: wait for it to be reopened, so the next publish need not retry.
            await reopened(self.channel)
            raise InvalidPayloadError(
                f"the broker refused {what}: {e}; lower the payload size, and set "
                "RMQDELAY_MAX_MESSAGE_SIZE to the broker's max_message_size so that such "
                "tasks are refused before sending"
            ) from e
        if not isinstance(confirm, Basic.Ack):
            raise PublishNotConfirmedError(
                f"the broker answered {confirm!r} instead of an ack for {what}"
            )


class _Nacked(Exception):
    """The broker refused a message (basic.nack): a quorum queue it routes to has no leader
    for the moment (an election after a node died) or refuses more. Nothing was enqueued
    (a task routes to one queue), so publishing again is safe until the deadline."""


class _LinkLost(Exception):
    """The connection was given up (no frame for several heartbeats) while a publish
    waited for its confirm."""


class _Blocked(Exception):
    """A resource alarm blocks the connection, and did not clear before the deadline: the
    message was not sent."""

    def __init__(self, alarm: Alarm) -> None:
        super().__init__(f"the broker blocks publishing: resource alarm {alarm.reason!r}")
        self.alarm = alarm


_RETRYABLE: tuple[type[BaseException], ...] = (*PUBLISH_RETRYABLE, _Nacked, _Blocked, _LinkLost)


def until_deadline(
    seconds: float,
    retry_on: tuple[type[BaseException], ...],
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> AsyncRetrying:
    """How every call that waits out an outage within RMQDELAY_PUBLISH_DEADLINE retries:
    short waits growing to 2 s, with jitter, until ``seconds`` have passed; the last
    failure is raised as it was."""
    return AsyncRetrying(
        stop=stop_after_delay(max(0.0, seconds)),
        wait=wait_exponential(multiplier=0.1, max=2) + wait_random(0, 0.2),
        retry=retry_if_exception_type(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )


async def reopened(channel: AbstractChannel) -> None:
    """Wait (briefly) until aio-pika has reopened a channel the broker closed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REOPEN_WAIT_S):
            while channel.is_closed:  # noqa: ASYNC110 - aio-pika offers no event for it
                await asyncio.sleep(0.01)
