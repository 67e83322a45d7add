"""Connecting to the broker, with retries on the errors worth retrying."""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import (
    AMQPConnectionError,
    AuthenticationError,
    ChannelInvalidStateError,
    ConnectionNotAllowed,
    ProbableAuthenticationError,
)
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from rmqdelay.errors import BrokerUnavailableError
from rmqdelay.settings import Settings

log = logging.getLogger("rmqdelay.connection")

#: Failures that may pass if we try again: the broker is starting, restarting or unreachable.
CONNECTION_EXCEPTIONS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    TimeoutError,
    AMQPConnectionError,
)
#: What a publish raises while its connection is down or being restored.
PUBLISH_RETRYABLE: tuple[type[BaseException], ...] = (
    *CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
)
#: Seconds between the robust connection's reconnect attempts after a drop.
RECONNECT_INTERVAL_S = 1.0
#: Failures no retry will fix: wrong credentials, unknown vhost, no permission.
_FINAL = (AuthenticationError, ProbableAuthenticationError, ConnectionNotAllowed)


def _retryable(error: BaseException) -> bool:
    return isinstance(error, CONNECTION_EXCEPTIONS) and not isinstance(error, _FINAL)


def _log_retry(settings: Settings) -> object:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "cannot connect to %s (attempt %d): %s; retrying",
            settings.safe_url,
            state.attempt_number,
            error,
        )

    return before_sleep


def _log_drops(connection: AbstractRobustConnection, settings: Settings) -> None:
    """Say when the link drops and when it is back; aio-pika reconnects by itself."""

    def lost(_: object, error: BaseException | None = None) -> None:
        if not connection.is_closed:  # is_closed: a close we asked for
            log.warning(
                "connection to %s lost (%s); reconnecting every %.0fs",
                settings.safe_url,
                error,
                RECONNECT_INTERVAL_S,
            )

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(lambda *_: log.info("reconnected to %s", settings.safe_url))


async def connect(settings: Settings) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself later), retrying the first connect.

    Raises:
        BrokerUnavailableError: no connection within ``settings.connect_timeout``, or the
            broker refused the credentials or the vhost.
    """
    retrying = AsyncRetrying(
        stop=stop_after_delay(settings.connect_timeout.total_seconds()),
        wait=wait_exponential(multiplier=0.2, max=5) + wait_random(0, 0.5),
        retry=retry_if_exception(_retryable),
        before_sleep=_log_retry(settings),  # type: ignore[arg-type]
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                connection = await aio_pika.connect_robust(
                    settings.url, timeout=10, reconnect_interval=RECONNECT_INTERVAL_S
                )
                _log_drops(connection, settings)
                return connection
    except CONNECTION_EXCEPTIONS as e:
        hint = (
            "check the credentials and vhost in RMQDELAY_URL"
            if isinstance(e, _FINAL)
            else "is the broker running? (scripts/broker starts one)"
        )
        raise BrokerUnavailableError(
            f"cannot connect to RabbitMQ at {settings.safe_url}: {e or type(e).__name__}; {hint}"
        ) from e
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
