"""The worker: consume a destination's work queue and see each delivery through.

``Worker`` owns the connection, start and stop, and the way from a delivery to its
settlement: hold it until due (``hold.py``), take a concurrency slot, run it
(``execute.py``) and settle it (``settle.py``). The consumer itself, and its loss, is
``subscription.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import astuple
from datetime import timedelta
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage, TaskWrapper

from rmqdelay.broker import tracing
from rmqdelay.broker.cancels import CancelFollower
from rmqdelay.broker.connection import connect
from rmqdelay.broker.declare import check_topology, resolve_backend
from rmqdelay.broker.keeper import JournalKeeper
from rmqdelay.broker.publisher import Publisher
from rmqdelay.core.errors import ConfigError, RmqDelayError
from rmqdelay.core.redact import Redactor
from rmqdelay.core.retry import RetryPolicy
from rmqdelay.core.task import Handler
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import ATTEMPT, DEFAULT_ACCEPT, PUBLISHED_MS
from rmqdelay.settings import Settings
from rmqdelay.worker.clocks import SkewReport
from rmqdelay.worker.delivery import Delivery
from rmqdelay.worker.execute import (
    Cancelled,
    Deferred,
    Executed,
    Execution,
    Failed,
    Repeated,
    Result,
    Skipped,
    Undecodable,
    settle_margin_s,
)
from rmqdelay.worker.hold import Holder, due_s, max_hold_s
from rmqdelay.worker.metrics import WorkerMetrics, serve
from rmqdelay.worker.report import Reporter
from rmqdelay.worker.series import SeriesKeeper
from rmqdelay.worker.settle import Settler
from rmqdelay.worker.stats import Tally, WorkerStats
from rmqdelay.worker.subscription import Subscription
from rmqdelay.worker.threads import DaemonThreadPool

log = logging.getLogger(__name__)
#: Seconds between the info-level summaries a busy worker logs.
SUMMARY_INTERVAL_S = 60.0
#: How often running handlers are checked against the broker's consumer timeout (more
#: often for a timeout so short that its margin is under four of these).
OVERRUN_CHECK_S = 1.0
#: A delivery that waited this long for a slot (from its arrival, its hold included) is
#: handed back rather than left to the broker's consumer timeout (30 min by default):
#: this, plus the longest handler run, must stay under the broker's timeout.
MAX_UNACKED_S = 600.0
#: After the grace period, how long cancelled handlers get to unwind before the worker
#: gives up on them (an async handler may swallow the cancellation).
UNWIND_S = 5.0


class Worker:
    """Executes the tasks of one destination with ``handler``.

    Run it with ``await worker.run(stop)``; setting ``stop`` stops consuming, lets in-flight
    tasks finish within ``settings.shutdown_grace`` and returns every other delivered task
    to the queue.

    Nothing a handler does other than return (any exception, ``SystemExit`` and
    ``KeyboardInterrupt`` included) stops the worker: it is a failed attempt of that task.
    """

    def __init__(
        self,
        settings: Settings,
        destination: str,
        handler: Handler,
        *,
        concurrency: int | None = None,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        handler_timeout: timedelta | None = None,
        accept: Collection[str] | None = None,
        raw: bool = False,
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.wiring = settings.wiring
        self.destination = self.wiring.names.check_destination(destination)
        self.handler = handler
        _check_between("concurrency", concurrency, 1, 10_000)
        _check_between("prefetch", prefetch, 1, 65_535)
        _check_between("metrics_port", metrics_port, 0, 65_535)
        self.concurrency = concurrency or settings.concurrency
        self.prefetch = prefetch or settings.prefetch_for(self.concurrency)
        self.retry = retry or settings.retry_policy
        self.handler_timeout = handler_timeout or settings.handler_timeout
        self.accept = frozenset(accept) if accept else DEFAULT_ACCEPT
        #: Hand every message over as its raw body, whatever its content type (or none):
        #: for handlers that pass messages on (``--forward``) rather than read them.
        self.raw = raw
        self.metrics = WorkerMetrics(self.destination, settings.namespace)
        self._tally = Tally(self.metrics)
        #: Counts since the worker started (``wait_for`` waits on them).
        self.stats: WorkerStats = self._tally.stats
        #: Set once the worker consumes; tests and the demo wait on it.
        self.ready = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._threads: DaemonThreadPool | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._follower = CancelFollower(settings)
        self.metrics.cancels_behind.set_function(self._follower.behind_s)
        self._holder = Holder(self._tally, self.metrics, self._release)
        self._skew = SkewReport()
        #: How long a delivery may wait (held, then for a slot) before it is handed back.
        self.max_unacked_s = MAX_UNACKED_S
        self._max_hold_s = max_hold_s(settings.resolution_ms, settings.hold_window_s)
        # Both made in run(), once the channel (and so the publisher) exists.
        self._execution: Execution | None = None
        self._settler: Settler | None = None
        #: Serve /metrics and /healthz here (0: any free port; see ``metrics_address``).
        self.metrics_port = metrics_port
        self.metrics_address: tuple[str, int] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._subscription: Subscription | None = None
        #: Keeps the journal when no other worker does (None: no journal to keep).
        self.keeper: JournalKeeper | None = None

    async def run(self, stop: asyncio.Event) -> WorkerStats:
        """Consume until ``stop`` is set, then shut down cleanly. Returns the counts.

        Raises:
            ConsumerCancelledError: the broker cancelled the consumer (its queue was
                deleted) and the queue could not be declared again.
        """
        self.settings = await resolve_backend(self.settings)
        self.wiring = self.settings.wiring
        connection = self._connection = await connect(self.settings)
        try:
            # Publishes (retries, parking, stats) go on a connection of their own: RabbitMQ
            # stops reading a connection that publishes while a disk or memory alarm is
            # raised, and acks sharing it would stall with them.
            publishing = await connect(self.settings)
        except BaseException:
            await connection.close()
            raise
        self._stopping = False
        server = await self._serve_metrics()
        threads = self._threads = DaemonThreadPool(self.concurrency, thread_name_prefix="rmqdelay")
        self._execution = Execution(
            self.handler,
            accept=self.accept,
            raw=self.raw,
            timeout=self.handler_timeout,
            consumer_timeout=self.settings.consumer_timeout,
            cancels=self._follower.cancels,
            threads=threads,
            metrics=self.metrics,
        )
        # Waiting for a slot may take at most half of the time a handler has before the
        # broker's consumer timeout: the other half is the handler's.
        self.max_unacked_s = min(self.max_unacked_s, self._execution.stop_after_s / 2)
        reporter = asyncio.create_task(self._report_periodically())
        overruns = asyncio.create_task(self._watch_overruns(self._execution))
        stop_following = asyncio.Event()
        following: asyncio.Task[None] | None = None
        keeping: asyncio.Task[None] | None = None
        reporting: asyncio.Task[None] | None = None
        report = Reporter(self.stats, self.destination, self.wiring.names.stats)
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.prefetch)
            publishing_channel = await publishing.channel(
                publisher_confirms=True, on_return_raises=True
            )
            publisher = Publisher(self.settings, publishing_channel)
            self._settler = Settler(
                self.wiring,
                self.destination,
                publisher,
                self.retry,
                self._tally,
                Redactor(list(self.settings.secrets)),
            )
            self._execution.series = SeriesKeeper(self.wiring, publisher, self._follower.cancels)
            subscription = self._subscription = Subscription(
                self.settings, self.destination, self._on_delivery
            )
            if not self.settings.declare:
                await subscription.check(connection)  # the likeliest miss, with its advice
            await check_topology(
                self.settings, build_topology(self.wiring.layout, (self.destination,)), channel
            )
            await subscription.check(connection)
            await subscription.watch(channel)
            following = asyncio.create_task(self._follower.run(stop_following))
            # A dropped connection may have hidden cancels: vouch for nothing until a fresh
            # marker has come back through the stream.
            connection.close_callbacks.add(lambda *_: self._follower.pause())
            connection.close_callbacks.add(lambda *_: self._gauge_connected(0))
            connection.reconnect_callbacks.add(lambda *_: self._gauge_connected(1))
            connection.reconnect_callbacks.add(lambda *_: self._follower.resync())
            await _until(following, self._follower.caught_up.wait())
            if self.settings.journal and self.wiring.layout.backend == "levels":
                keeper = self.keeper = JournalKeeper(self.settings, self._follower.cancels)
                keeping = asyncio.create_task(keeper.run(stop_following))
            reporting = asyncio.create_task(report.run(publishing_channel))
            await self._consume(channel, subscription, stop, following)
        finally:
            self._stopping = True
            self.ready.clear()
            reporter.cancel()
            overruns.cancel()
            self._gauge_connected(0)
            if server is not None:
                server.close()
            await self._drain()
            if reporting is not None:
                reporting.cancel()
                if not publishing_channel.is_closed:
                    # The last seconds, drained tasks included.
                    await report.write(publishing_channel)
            stop_following.set()
            if keeping is not None:
                # A pass may read for a while; one cut short is redone by the next keeper.
                keeping.cancel()
            await asyncio.gather(
                *(task for task in (following, keeping) if task is not None),
                return_exceptions=True,
            )
            # Daemon threads: a handler stuck in a blocking call cannot hold the process.
            threads.shutdown(wait=False, cancel_futures=True)
            await connection.close()
            await publishing.close()
        log.info("worker for %s stopped: %s", self.destination, self.stats.summary())
        return self.stats

    async def _consume(
        self,
        channel: AbstractChannel,
        subscription: Subscription,
        stop: asyncio.Event,
        following: asyncio.Task[None],
    ) -> None:
        """Consume until ``stop``; when the broker cancels the consumer (or refuses to
        start it: the queue is gone), declare the queue again and resume, or raise
        ConsumerCancelledError."""
        while True:
            if await subscription.consume(channel):
                log.info(
                    "consuming %s (concurrency %d, prefetch %d) on %s",
                    subscription.name,
                    self.concurrency,
                    self.prefetch,
                    self.settings.safe_url,
                )
                self.ready.set()
                self._gauge_connected(1)
                await _until(following, stop.wait(), subscription.lost.wait())
            if stop.is_set():
                self._stopping = True
                await subscription.stop(channel)
                return
            self.ready.clear()
            log.warning(
                "the broker cancelled the consumer of %s (its queue was deleted, or on "
                "RabbitMQ 4.3 a task outlived RMQDELAY_CONSUMER_TIMEOUT); consuming again",
                subscription.name,
            )
            assert self._connection is not None
            await subscription.declare_again(self._connection)

    def health(self) -> dict[str, bool]:
        """Whether the worker is connected, and consuming with its cancellation set current."""
        connection = self._connection
        return {
            "connected": connection is not None and not connection.is_closed
            and connection.connected.is_set(),
            "consuming": self.ready.is_set() and self._follower.caught_up.is_set()
            and self._subscription is not None and not self._subscription.lost.is_set(),
        }  # fmt: skip

    async def _serve_metrics(self) -> asyncio.Server | None:
        if self.metrics_port is None:
            return None
        server = await serve(self.metrics, self.health, self.metrics_port)
        address = server.sockets[0].getsockname()
        self.metrics_address = (address[0], address[1])
        return server

    def _gauge_connected(self, value: int) -> None:
        self.metrics.connected.set(value)

    async def wait_for(self, condition: Callable[[WorkerStats], bool]) -> WorkerStats:
        """Return once ``condition(stats)`` holds, re-checked whenever a task is counted.

        For example ``await worker.wait_for(lambda s: s.executed >= 10)``; bound it with
        ``asyncio.timeout``.
        """
        return await self._tally.wait_for(condition)

    async def _report_periodically(self) -> None:
        """An info line every SUMMARY_INTERVAL_S while tasks come in: a worker runs for months."""
        last: tuple[object, ...] | None = None
        while True:
            await asyncio.sleep(SUMMARY_INTERVAL_S)
            current = astuple(self.stats)
            if current != last:
                log.info("worker for %s: %s", self.destination, self.stats.summary())
                last = current

    async def _overran(self, message: Delivery, result: Result, settler: Settler) -> None:
        """A handler that outlived the consumer timeout has ended. The broker holds the
        task again (its copy counts toward the delivery limit), so this run is not retried;
        a success cancels the copies by id that have not started yet."""
        if not message.channel.is_closed:
            await message.ack()  # RabbitMQ 4.3 ignores an ack for a task it took back
        if not isinstance(result, Executed):
            self._tally.count("failed")
            log.error(
                "task %s ended after the consumer timeout without success; its copy in the "
                "queue goes on", message.message_id,
            )  # fmt: skip
            return
        self._tally.executed(result.lateness_s, result.past_due)
        try:
            await settler.cancel_copies(message)
        except RmqDelayError as e:
            log.error("could not cancel the copies of task %s: %s", message.message_id, e)

    async def _watch_overruns(self, execution: Execution) -> None:
        """Stop handlers near the broker's consumer timeout, and say at once when one
        outlives it: the broker has taken its task back and may be running it elsewhere at
        the same time."""
        every_s = min(OVERRUN_CHECK_S, settle_margin_s(execution.consumer_timeout_s) / 4)
        while True:
            await asyncio.sleep(every_s)
            for task in execution.enforce():
                self.stats.overran += 1
                log.error(
                    "task %s (attempt %d) has run for over %gs, past RabbitMQ's consumer "
                    "timeout (RMQDELAY_CONSUMER_TIMEOUT), and its handler did not stop when "
                    "asked at %gs: the broker has taken the task back and may already run "
                    "it on another worker, at the same time as this one. When this run ends "
                    "it is not retried; if it succeeds, copies that have not started yet "
                    "are cancelled. Make the handler stop when cancelled, or raise "
                    "RMQDELAY_CONSUMER_TIMEOUT.",
                    task.id, task.attempt, execution.consumer_timeout_s,
                    execution.stop_after_s,
                )  # fmt: skip

    async def _drain(self) -> None:
        """Let in-flight tasks finish within the grace period; cancel (and give back) the rest.

        A handler that ignores the cancellation (or a plain one stuck in its thread) is
        abandoned after UNWIND_S more: closing the connection returns its task to the queue.
        """
        held = self._holder.take_all()  # not due yet: back to the queue at once
        if held and self._settler is not None:
            # Each goes back as a confirmed copy and then is acked: closing the connection
            # before the ack would leave the task twice in the queue.
            giving = [asyncio.create_task(self._settler.give_back(m)) for m in held]
            await asyncio.wait(giving, timeout=self.settings.shutdown_grace.total_seconds())
        if self._running:
            grace = self.settings.shutdown_grace.total_seconds()
            log.info("waiting up to %.0fs for %d in-flight task(s)", grace, len(self._running))
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%d task(s) did not finish in time; returned to the queue", len(pending)
                )
                _, stuck = await asyncio.wait(pending, timeout=UNWIND_S)
                self.stats.abandoned += len(stuck)
        # A plain handler's thread runs on after its task was cancelled.
        self.stats.abandoned += self._threads.running if self._threads else 0
        if self.stats.abandoned:
            log.error(
                "abandoning %d handler(s) that did not stop (stuck in a call, or ignoring "
                "cancellation); their tasks are back in the queue",
                self.stats.abandoned,
            )

    def _on_delivery(self, message: DeliveredMessage) -> Coroutine[Any, Any, None]:
        return self._on_message(Delivery(message))

    async def _on_message(self, message: Delivery) -> None:
        now = time.time()  # one clock read per delivery, on the hot path
        self._skew.check(message.headers, now * 1000)
        due = due_s(message.headers)
        # Stopping: _run hands it back, as it does a held one (a delivery may still come
        # in while the consumer is being cancelled, after the held ones went back).
        if due is None or due <= now or self._stopping:
            await self._run(message)
        elif due - now <= self._max_hold_s:
            self._holder.hold(message, due)  # released to _release when due
        else:
            assert self._settler is not None
            try:
                await self._settler.send_back(message, due)
            except RmqDelayError as e:  # could not be published: requeued
                log.error("%s", e)

    def _release(self, message: Delivery) -> None:
        """A held task is due: run it, in a task of its channel's, as a task that arrived
        due runs (a channel that closes cancels both alike)."""
        made = message.channel.create_task(self._run(message))
        task = made.task if isinstance(made, TaskWrapper) else made
        self._running.add(task)  # at once: a stop that begins now must wait for it too
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("a held task failed unexpectedly", exc_info=error)

    async def _run(self, message: Delivery) -> None:
        current = asyncio.current_task()
        assert current is not None
        assert self._settler is not None
        settler = self._settler
        started = False
        try:
            self._running.add(current)
            if not await self._slot(message):
                self._tally.count("backlogged")
                await settler.give_back(message)
                return
            try:
                caught_up = self._follower.caught_up
                if not caught_up.is_set():
                    await caught_up.wait()
                if self._stopping:
                    await settler.give_back(message)
                    return
                started = True
                await self._execute(message, settler)
            finally:
                self._slots.release()
        except asyncio.CancelledError:
            # At stop. Waiting: handed back, not counted. Running past the grace period:
            # returned as a worker's death returns it (redelivered, and counted toward the
            # delivery limit), since its handler may have done part of it.
            await (settler.requeue if started else settler.give_back)(message)
            raise
        except RmqDelayError as e:  # a retry or park that could not be published: requeued
            log.error("%s", e)
        finally:
            self._running.discard(current)

    async def _slot(self, message: Delivery) -> bool:
        """Take a concurrency slot; False if none came free within ``max_unacked_s`` of
        the delivery's arrival. The broker closes a channel holding a delivery unacked
        past its consumer timeout (30 min by default) and returns every unacked one, so a
        worker whose prefetch outruns its handlers hands the excess back in time instead:
        a fresh copy at the queue's tail, not counted toward its delivery limit."""
        if not self._slots.locked():
            await self._slots.acquire()  # free: no timer on the usual path
            return True
        try:
            async with asyncio.timeout(message.arrived + self.max_unacked_s - time.monotonic()):
                await self._slots.acquire()
        except TimeoutError:
            return False
        return True

    async def _execute(self, message: Delivery, settler: Settler) -> None:
        assert self._execution is not None
        if not tracing.recording():
            await self._settle(message, await self._execution.run(message), settler)
            return
        headers = message.headers or {}
        with tracing.executing(
            headers, self.destination, message.message_id, headers.get(PUBLISHED_MS)
        ) as span:
            result = await self._execution.run(message)
            tracing.outcome(span, *_outcome(result), attempt=headers.get(ATTEMPT, 1))
            await self._settle(message, result, settler)

    async def _settle(self, message: Delivery, result: Result, settler: Settler) -> None:
        assert self._execution is not None
        if message.overran:
            await self._overran(message, result, settler)
        elif isinstance(result, Executed):
            self._execution.settled(message)  # before the ack, which a dropped link loses
            await message.ack()
            self._tally.executed(result.lateness_s, result.past_due)
        elif isinstance(result, Failed):
            await self._retry_or_park(message, result, settler)
        elif isinstance(result, Cancelled):
            # Debug only: one cancel of a busy key can skip thousands (counted, summarised).
            log.debug("task %s cancelled by %r; not run", message.message_id, result.key)
            await message.ack()
            self._tally.count("cancelled")
        elif isinstance(result, Skipped):
            await message.ack()
            self._tally.count("skipped")
        elif isinstance(result, Repeated):
            log.debug("task %s ran here already (ack lost); not run again", message.message_id)
            await message.ack()
            self._tally.count("repeated")
        elif isinstance(result, Deferred):
            log.error(
                "task %s not run: %s; returning it to the queue", message.message_id, result.error
            )
            await settler.requeue(message)
        else:
            assert isinstance(result, Undecodable)
            log.warning(
                "cannot decode message %s: %s; parking it", message.message_id, result.error
            )
            await settler.park(
                message, f"undecodable: {result.error}", error="MessageDecodeError", attempts=0
            )

    async def _retry_or_park(self, message: Delivery, result: Failed, settler: Settler) -> None:
        assert self._execution is not None
        try:
            await settler.retry_or_park(
                message, result.task, result.error, result.detail, result.delay
            )
        except RmqDelayError:
            raise  # its retry or parked copy was not confirmed: requeued, to run again
        except BaseException:
            self._execution.settled(message)  # the copy is confirmed; only the ack failed
            raise
        self._execution.settled(message)


def _outcome(result: Result) -> tuple[str, str | None]:
    """What a trace's execute span says of ``result``: its kind, and an error if it failed."""
    # The error's type only: its text may hold a secret (the park span has it redacted).
    if isinstance(result, Failed):
        return "failed", result.error
    if isinstance(result, Undecodable):
        return "undecodable", "MessageDecodeError"
    return type(result).__name__.lower(), None


def _check_between(name: str, value: object, low: int, high: int) -> None:
    """Refuse a worker argument out of range (None: the settings' value)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


async def _until(following: asyncio.Task[None], *events: Awaitable[object]) -> None:
    """Wait for any of ``events``; if the cancellation follower dies first, raise what
    killed it."""
    waiting = [asyncio.ensure_future(event) for event in events]
    try:
        await asyncio.wait({*waiting, following}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiting:
            w.cancel()
    if following.done():
        following.result()
        raise RuntimeError("the cancellation follower stopped unexpectedly")
