"""Connecting to the broker, with retries on the errors worth retrying."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aiormq.exceptions import (
    AMQPConnectionError,
    AuthenticationError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ConnectionNotAllowed,
    InvalidFrameError,
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
from yarl import URL

from rmqdelay.broker import alarms
from rmqdelay.core.errors import BrokerUnavailableError
from rmqdelay.core.redact import redact_url
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)

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
#: Reconnect waits: the first after a drop, and the longest however long the outage lasts.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
#: What a failed first connect may raise (InvalidFrameError: an unknown vhost).
_CONNECT_FAILURES: tuple[type[BaseException], ...] = (*CONNECTION_EXCEPTIONS, InvalidFrameError)
#: Failures no retry will fix: wrong credentials, unknown vhost, no permission.
_FINAL = (AuthenticationError, ProbableAuthenticationError, ConnectionNotAllowed)
#: How long one connection attempt may take, TCP and AMQP handshake together.
ATTEMPT_TIMEOUT_S = 10.0


def queue_starting(error: BaseException) -> bool:
    """Whether a 404 only means the queue's node is still (re)starting: RabbitMQ answers
    "home node ... of durable queue ... is down or inaccessible" for a while after a restart.
    Transient, unlike a queue that does not exist."""
    if isinstance(error, ChannelNotFoundEntity):
        return "down or inaccessible" in str(error)
    # A stream consumer on a node whose replica is still catching up after a restart
    # (RabbitMQ 3.10): "does not have a replica on the local node". Seen in a rolling
    # restart; the replica comes back within seconds.
    return isinstance(error, ChannelPreconditionFailed) and "replica on the local node" in str(
        error
    )


def _retryable(error: BaseException) -> bool:
    # A certificate the client refuses (or that the broker refuses) stays refused.
    final = (*_FINAL, ssl.SSLError)
    return isinstance(error, CONNECTION_EXCEPTIONS) and not isinstance(error, final)


def _closed_on_open(error: BaseException) -> bool:
    """RabbitMQ answers connection.open for a vhost that does not exist, or that the user
    may not use, with connection.close (530); aiormq reports that as an unexpected frame."""
    return isinstance(error, InvalidFrameError) and "Connection.Close" in str(error)


def _hint(settings: Settings, error: BaseException) -> str:
    if isinstance(error, _FINAL):
        return "check the credentials and vhost in RMQDELAY_URL"
    if urlsplit(settings.urls[0]).scheme == "amqps":
        return (
            "check the broker's TLS port and certificate, and RMQDELAY_TLS_CA_FILE / "
            "RMQDELAY_TLS_CERT_FILE / RMQDELAY_TLS_KEY_FILE"
        )
    return "is the broker running? (scripts/broker starts one)"


def _tcp_answers(settings: Settings) -> bool:
    for url in settings.urls:
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        try:
            socket.create_connection((parts.hostname or "localhost", port), timeout=2).close()
        except OSError:
            continue
        return True
    return False


async def unavailable(settings: Settings, error: BaseException) -> BrokerUnavailableError:
    """One line saying why no connection could be made, and what to do about it."""
    where = f"RabbitMQ at {settings.safe_url}"
    if _closed_on_open(error):
        vhost = unquote(urlsplit(settings.urls[0]).path[1:] or "/")
        user = unquote(urlsplit(settings.urls[0]).username or "guest")
        return BrokerUnavailableError(
            f"{where} refused to open vhost {vhost!r}: it does not exist, or user {user!r} has "
            f"no permissions on it (rabbitmqctl add_vhost / set_permissions -p {vhost!r})"
        )
    if isinstance(error, TimeoutError) and await asyncio.to_thread(_tcp_answers, settings):
        return BrokerUnavailableError(
            f"{where} accepted the TCP connection but did not complete the AMQP handshake in "
            f"time. Likely causes: the broker ran out of file handles (see its log and "
            "/proc/<pid>/limits; docs/how-to/operators.md), is overloaded or still starting, or "
            "the port is not AMQP (an amqps:// port with amqp://, or a proxy)"
        )
    reason = str(error) or type(error).__name__
    return BrokerUnavailableError(f"cannot connect to {where}: {reason}; {_hint(settings, error)}")


def _log_retry(settings: Settings) -> object:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        urls = settings.urls
        log.warning(
            "cannot connect to %s (attempt %d): %s; retrying",
            redact_url(urls[(state.attempt_number - 1) % len(urls)]),
            state.attempt_number,
            error,
        )

    return before_sleep


def reconnect_wait(outage_s: float) -> float:
    """Wait before the next reconnect attempt, an outage of ``outage_s`` seconds in.

    Half the outage so far: quick after a blip, ever slower (up to a cap) while a broker
    stays down, so a fleet of workers does not hammer a broker that is starting.
    """
    return min(RECONNECT_MAX_S, max(RECONNECT_FIRST_S, outage_s / 2))


class BackoffRobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, waiting longer between attempts as an outage lasts,
    and trying the next node of a cluster after each drop or failed attempt."""

    _lost_at: float | None = None
    _closing = False
    _urls: tuple[URL, ...] = ()

    def fail_over(self, urls: tuple[str, ...]) -> None:
        """Reconnect to these URLs in turn, starting after the one connected now."""
        self._urls = tuple(URL(url) for url in urls)

    def next_url(self) -> None:
        """Point the next (re)connect attempt at the next node."""
        if len(self._urls) > 1:
            at = self._urls.index(self.url) if self.url in self._urls else -1
            self.url = self._urls[(at + 1) % len(self._urls)]

    async def _RobustConnection__connect_transport(self) -> None:
        # aio-pika's reconnect loop calls this (name-mangled) method for every attempt and
        # reads self.url inside it; there is no public hook. tests/unit/test_connection.py
        # fails if an aio-pika upgrade renames it.
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except BaseException:
            self.next_url()
            raise
        if self.transport is not None:
            alarms.watch(self.transport.connection)

    async def close(self, exc: Any = asyncio.CancelledError) -> None:
        """Close for good (the close callbacks then must not report a lost connection)."""
        self._closing = True
        await super().close(exc)

    @property
    def reconnect_interval(self) -> float:
        """Read by aio-pika before each attempt; derived from the outage's length."""
        if self._lost_at is None:
            return RECONNECT_FIRST_S
        return reconnect_wait(time.monotonic() - self._lost_at)

    @reconnect_interval.setter
    def reconnect_interval(self, _: float) -> None:
        pass  # the base class sets a fixed value in __init__

    def watch(self) -> None:
        """Track outages (for the backoff) and log when the link drops and comes back."""

        def lost(*_: object) -> None:
            # aio-pika calls this on the drop and again on every failed attempt after it;
            # is_closed means a close we asked for.
            if not (self.is_closed or self._closing) and self._lost_at is None:
                self._lost_at = time.monotonic()
                log.warning("connection to %s lost; reconnecting with backoff", self)
                self.next_url()

        def restored(*_: object) -> None:
            outage = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
            self._lost_at = None
            log.info("reconnected to %s after %.1fs", self, outage)

        self.close_callbacks.add(lost)
        self.reconnect_callbacks.add(restored)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for an ``amqps://`` URL: system CAs unless a CA file is given, and
    the client certificate when one is. None for plain ``amqp://``."""
    if urlsplit(settings.urls[0]).scheme != "amqps":
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
    )
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return context


def amqp_urls(settings: Settings) -> tuple[str, ...]:
    """The URLs to connect to, each with RMQDELAY_HEARTBEAT unless it names its own.

    The heartbeat is what notices a silent link (a cut network keeps a TCP connection open
    for many minutes): aio-pika gives a link up after about 3.5 heartbeats without a frame,
    and the broker after two; only then do clients move to another node.
    """
    beat = str(int(settings.heartbeat.total_seconds()))
    return tuple(
        url if "heartbeat" in parse_qs(urlsplit(url).query) else str(URL(url) % {"heartbeat": beat})
        for url in settings.urls
    )


def _attempt_timeout(settings: Settings) -> float:
    return min(ATTEMPT_TIMEOUT_S, settings.connect_timeout.total_seconds())


async def connect_once(settings: Settings, *, raw: bool = False) -> AbstractConnection:
    """One plain (non-reconnecting) connection, TLS settings applied, trying each node.

    Raises:
        BrokerUnavailableError: no node took it, saying why in one line (wrong
            credentials, an unknown vhost, nothing listening...); with ``raw``, only for
            what no retry fixes, the rest as aiormq raised it, for a caller that retries.
    """
    error: BaseException | None = None
    for url in amqp_urls(settings):
        try:
            return await _plain(url, settings)
        except InvalidFrameError as e:
            raise await unavailable(settings, e) from e
        except CONNECTION_EXCEPTIONS as e:
            if isinstance(e, _FINAL):
                raise await unavailable(settings, e) from e
            error = e  # the next node may answer
    assert error is not None
    if raw:
        raise error
    raise await unavailable(settings, error) from error


async def _plain(url: str, settings: Settings) -> AbstractConnection:
    """``aio_pika.connect``, except that a connection that fails to open is closed here.

    aio-pika leaves it to the garbage collector, whose ``__del__`` schedules its close on
    whatever loop runs then, or on none ("coroutine 'Connection.close' was never awaited",
    seen in CI when a follower's failed reconnects were collected during a sync test).
    """
    connection = aio_pika.Connection(URL(url), ssl_context=tls_context(settings))
    try:
        await connection.connect(timeout=_attempt_timeout(settings))
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    if connection.transport is not None:
        alarms.watch(connection.transport.connection)
    return connection


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
    urls = amqp_urls(settings)
    try:
        async for attempt in retrying:
            with attempt:
                # Attempt n tries node n (modulo the count): a dead node costs one attempt.
                url = urls[(attempt.retry_state.attempt_number - 1) % len(urls)]
                connection = await aio_pika.connect_robust(
                    url,
                    timeout=_attempt_timeout(settings),
                    connection_class=BackoffRobustConnection,
                    ssl_context=tls_context(settings),
                )
                assert isinstance(connection, BackoffRobustConnection)
                connection.fail_over(urls)
                connection.watch()
                return connection
    except _CONNECT_FAILURES as e:
        raise await unavailable(settings, e) from e
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
