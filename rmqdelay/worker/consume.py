"""The worker: consume a destination's work queue, run the handler, ack only afterwards."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import astuple, dataclass
from datetime import timedelta
from typing import Any, Literal, TypeAlias

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity
from pamqp.commands import Basic
from prometheus_client import Counter

from rmqdelay.broker.cancels import CancelFollower
from rmqdelay.broker.connection import RECONNECT_FIRST_S, connect, queue_starting
from rmqdelay.broker.declare import check_topology, declare_topology, resolve_backend
from rmqdelay.broker.publisher import Publisher, properties
from rmqdelay.core.errors import (
    ConsumerCancelledError,
    HandlerTimeoutError,
    InvalidDelayError,
    MessageDecodeError,
    PublishNotConfirmedError,
    RmqDelayError,
    TopologyMismatchError,
)
from rmqdelay.core.retry import Retry, RetryPolicy, decide
from rmqdelay.core.task import Handler, Task
from rmqdelay.core.topology import Topology, build_topology, destination_topology
from rmqdelay.core.wire import (
    ATTEMPT,
    DEFAULT_ACCEPT,
    DUE_MS,
    PAST_DUE_TOLERANCE_MS,
    TASK_ID,
    decode_task,
    parked_headers,
    published_ms,
    rescheduled_headers,
)
from rmqdelay.settings import Settings
from rmqdelay.worker.handler import call_handler, describe_failure
from rmqdelay.worker.metrics import WorkerMetrics, serve
from rmqdelay.worker.threads import DaemonThreadPool

log = logging.getLogger("rmqdelay.worker.consume")
Outcome: TypeAlias = Literal["executed", "failed", "retried", "parked", "cancelled", "requeued"]
#: Seconds between the info-level summaries a busy worker logs.
SUMMARY_INTERVAL_S = 60.0
#: After the grace period, how long cancelled handlers get to unwind before the worker
#: gives up on them (an async handler may swallow the cancellation).
UNWIND_S = 5.0
#: Held beyond two resolution units: clock skew between publisher and worker hosts.
MAX_HOLD_MARGIN_S = 5.0


@dataclass(slots=True)
class WorkerStats:
    """Counts since the worker started."""

    executed: int = 0
    failed: int = 0
    retried: int = 0
    parked: int = 0
    cancelled: int = 0
    requeued: int = 0
    #: Executed tasks that were scheduled with a due time already well past (``at=`` in
    #: the past): their lateness counts from their publish time instead.
    past_due: int = 0
    #: Tasks that arrived before their due time and were held until it.
    held: int = 0
    #: Handlers still running when the worker gave up on them at stop (tasks requeued).
    abandoned: int = 0
    lateness_max_s: float = 0.0
    lateness_total_s: float = 0.0

    def record_lateness(self, seconds: float) -> None:
        """Account one execution that started ``seconds`` after its due time."""
        self.lateness_max_s = max(self.lateness_max_s, seconds)
        self.lateness_total_s += seconds

    def summary(self) -> str:
        """One line for the log."""
        mean_ms = 1000 * self.lateness_total_s / self.executed if self.executed else 0.0
        return (
            f"executed {self.executed}, failed {self.failed}, retried {self.retried}, "
            f"cancelled {self.cancelled}, "
            f"parked {self.parked}, "
            f"requeued {self.requeued}, "
            f"scheduled past due {self.past_due}"
            + (f", abandoned {self.abandoned}" if self.abandoned else "")
            + "; "
            f"lateness mean {mean_ms:.0f} ms, max {1000 * self.lateness_max_s:.0f} ms"
        )


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
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.wiring = settings.wiring
        self.destination = self.wiring.names.check_destination(destination)
        self.handler = handler
        self.concurrency = concurrency or settings.concurrency
        self.prefetch = prefetch or settings.prefetch_for(self.concurrency)
        self.retry = retry or settings.retry_policy
        self.handler_timeout = handler_timeout or settings.handler_timeout
        self.accept = frozenset(accept) if accept else DEFAULT_ACCEPT
        self.stats = WorkerStats()
        #: Set once the worker consumes; tests and the demo wait on it.
        self.ready = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._executor: DaemonThreadPool | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._follower = CancelFollower(settings)
        self._counted = asyncio.Event()
        self.metrics = WorkerMetrics(self.destination)
        #: Serve /metrics and /healthz here (0: any free port; see ``metrics_address``).
        self.metrics_port = metrics_port
        self.metrics_address: tuple[str, int] | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consumer_tag: str | None = None
        self._consumer_lost = asyncio.Event()
        self._holding: set[asyncio.Task[None]] = set()
        self._publisher: Publisher | None = None
        #: Longer than this before its due time, a task goes back through the levels.
        self._max_hold_s = 2 * settings.resolution_ms / 1000 + MAX_HOLD_MARGIN_S

    async def run(self, stop: asyncio.Event) -> WorkerStats:
        """Consume until ``stop`` is set, then shut down cleanly. Returns the counts.

        Raises:
            ConsumerCancelledError: the broker cancelled the consumer (its queue was
                deleted) and the queue could not be declared again.
        """
        self.settings = await resolve_backend(self.settings)
        self.wiring = self.settings.wiring
        connection = self._connection = await connect(self.settings)
        self._stopping = False
        server = await self._serve_metrics()
        self._executor = DaemonThreadPool(self.concurrency, thread_name_prefix="rmqdelay")
        reporter = asyncio.create_task(self._report_periodically())
        stop_following = asyncio.Event()
        following: asyncio.Task[None] | None = None
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.set_qos(prefetch_count=self.prefetch)
            self._publisher = Publisher(self.settings, channel)
            if not self.settings.declare:
                await self._work_queue(channel)  # the likeliest miss, with advice of its own
            await check_topology(
                self.settings, build_topology(self.wiring.layout, (self.destination,)), channel
            )
            queue = await self._work_queue(channel)
            await self._watch_consumer(channel)
            following = asyncio.create_task(self._follower.run(stop_following))
            # A dropped connection may have hidden cancels: vouch for nothing until a fresh
            # marker has come back through the stream.
            connection.close_callbacks.add(lambda *_: self._follower.pause())
            connection.close_callbacks.add(lambda *_: self._gauge_connected(0))
            connection.reconnect_callbacks.add(lambda *_: self._gauge_connected(1))
            connection.reconnect_callbacks.add(lambda *_: self._follower.resync())
            await _until(following, self._follower.caught_up.wait())
            await self._consume(queue, stop, following)
        finally:
            self._stopping = True
            self.ready.clear()
            reporter.cancel()
            self._gauge_connected(0)
            if server is not None:
                server.close()
            await self._drain()
            stop_following.set()
            if following is not None:
                await asyncio.gather(following, return_exceptions=True)
            # Daemon threads: a handler stuck in a blocking call cannot hold the process.
            self._executor.shutdown(wait=False, cancel_futures=True)
            await connection.close()
        log.info("worker for %s stopped: %s", self.destination, self.stats.summary())
        return self.stats

    async def _consume(
        self, queue: AbstractQueue, stop: asyncio.Event, following: asyncio.Task[None]
    ) -> None:
        """Consume until ``stop``; when the broker cancels the consumer, declare the queue
        again and resume, or raise ConsumerCancelledError."""
        while True:
            self._consumer_lost.clear()
            self._consumer_tag = await queue.consume(self._on_message)
            log.info(
                "consuming %s (concurrency %d, prefetch %d) on %s",
                queue.name,
                self.concurrency,
                self.prefetch,
                self.settings.safe_url,
            )
            self.ready.set()
            self._gauge_connected(1)
            await _until(following, stop.wait(), self._consumer_lost.wait())
            if stop.is_set():
                self._stopping = True
                await queue.cancel(self._consumer_tag)
                return
            self.ready.clear()
            log.warning(
                "the broker cancelled the consumer of %s (was the queue deleted?); "
                "declaring it again",
                queue.name,
            )
            # Forget the dead consumer, so that aio-pika stops trying to restore it.
            await queue.cancel(self._consumer_tag)
            queue = await self._declare_again(queue)

    async def _watch_consumer(self, channel: AbstractChannel) -> None:
        """Hear of the broker cancelling our consumer, on this channel and after a reopen."""

        async def watch(*_: object) -> None:
            raw = await channel.get_underlay_channel()
            raw.on_consumer_cancel_callbacks.add(self._on_consumer_cancel)

        await watch()
        channel.reopen_callbacks.add(watch)  # type: ignore[attr-defined]

    def _on_consumer_cancel(self, frame: Basic.Cancel) -> None:
        if frame.consumer_tag == self._consumer_tag:
            self._consumer_lost.set()

    async def _declare_again(self, queue: AbstractQueue) -> AbstractQueue:
        topology = destination_topology(self.wiring.layout, self.destination)
        # Right after a broker restart the queue's node may still be starting: wait for it
        # as long as a first connect would.
        give_up = time.monotonic() + self.settings.connect_timeout.total_seconds()
        while True:
            try:
                await self._declare_on_a_probe(queue.name, topology)
                break
            except AMQPError as e:
                if not (queue_starting(e) and time.monotonic() < give_up):
                    raise self._cancelled_for_good(queue.name, e) from e
            except RmqDelayError as e:
                raise self._cancelled_for_good(queue.name, e) from e
            await asyncio.sleep(RECONNECT_FIRST_S)  # retry backoff, not synchronisation
        log.info("work queue %s is back", queue.name)
        return queue

    async def _declare_on_a_probe(self, name: str, topology: Topology) -> None:
        """Declare (or, without declaring rights, check) the work queue on a channel of its
        own: a failed declare closes its channel, which must not be the consuming one."""
        assert self._connection is not None
        async with self._connection.channel() as probe:
            if self.settings.declare:
                await declare_topology(probe, topology)
            else:
                await probe.declare_queue(name, passive=True)

    def _cancelled_for_good(self, name: str, e: BaseException) -> ConsumerCancelledError:
        advice = (
            f"declare it ('rmqdelay declare {self.destination}') and restart the worker"
            if not self.settings.declare
            else "check the worker's permissions and the namespace's exchanges"
        )
        return ConsumerCancelledError(
            f"work queue {name!r} was deleted under the worker (the broker cancelled its "
            f"consumer) and could not be declared again ({type(e).__name__}: {e}); {advice}"
        )

    def health(self) -> dict[str, bool]:
        """Whether the worker is connected, and consuming with its cancellation set current."""
        connection = self._connection
        return {
            "connected": connection is not None and not connection.is_closed
            and connection.connected.is_set(),
            "consuming": self.ready.is_set() and self._follower.caught_up.is_set()
            and not self._consumer_lost.is_set(),
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
        while not condition(self.stats):
            self._counted.clear()
            await self._counted.wait()
        return self.stats

    def _count(self, outcome: Outcome) -> None:
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        if outcome != "requeued":  # a requeue is not an outcome of the task
            counter: Counter = getattr(self.metrics, outcome)
            counter.inc()
        self._counted.set()

    async def _work_queue(self, channel: AbstractChannel) -> AbstractQueue:
        name = self.wiring.names.work_queue(self.destination)
        try:
            return await channel.get_queue(name, ensure=True)
        except ChannelNotFoundEntity as e:
            raise TopologyMismatchError(
                f"work queue {name!r} for destination {self.destination!r} does not exist and "
                "RMQDELAY_DECLARE is false: declare it ('rmqdelay declare "
                f"{self.destination}') or let the worker declare (RMQDELAY_DECLARE=true)"
            ) from e

    async def _report_periodically(self) -> None:
        """An info line every SUMMARY_INTERVAL_S while tasks come in: a worker runs for months."""
        last: tuple[object, ...] | None = None
        while True:
            await asyncio.sleep(SUMMARY_INTERVAL_S)
            current = astuple(self.stats)
            if current != last:
                log.info("worker for %s: %s", self.destination, self.stats.summary())
                last = current

    async def _drain(self) -> None:
        """Let in-flight tasks finish within the grace period; cancel (and requeue) the rest.

        A handler that ignores the cancellation (or a plain one stuck in its thread) is
        abandoned after UNWIND_S more: closing the connection returns its task to the queue.
        """
        for holder in self._holding:
            holder.cancel()  # not due yet: back to the queue at once, not after the grace
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
        self.stats.abandoned += self._executor.running if self._executor else 0
        if self.stats.abandoned:
            log.error(
                "abandoning %d handler(s) that did not stop (stuck in a call, or ignoring "
                "cancellation); their tasks are back in the queue",
                self.stats.abandoned,
            )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        current = asyncio.current_task()
        assert current is not None
        try:
            if not await self._hold(message, current):
                return
            self._running.add(current)
            async with self._slots:
                await self._follower.caught_up.wait()
                if self._stopping:
                    await self._requeue(message)
                    return
                await self._process(message)
        except asyncio.CancelledError:
            await self._requeue(message)
            raise
        except RmqDelayError as e:  # a retry or park that could not be published: requeued
            log.error("%s", e)
        finally:
            self._running.discard(current)

    async def _hold(self, message: AbstractIncomingMessage, current: asyncio.Task[None]) -> bool:
        """Keep an early task (unacked, outside the concurrency slots) until it is due.

        The levels deliver up to one resolution unit early. A task due much later than that
        (a publisher's wrong plan, clock skew) goes back through the levels rather than
        sitting in memory. Returns False when the task was sent back.
        """
        due_s = _due_s(message.headers)
        if due_s is None or due_s <= time.time():
            return True
        if due_s - time.time() > self._max_hold_s:
            await self._send_back(message, due_s)
            return False
        self._holding.add(current)
        self.metrics.held.inc()
        self.stats.held += 1
        self._counted.set()
        log.debug(
            "holding %s for %.0f ms until it is due",
            (message.headers or {}).get(TASK_ID), 1000 * (due_s - time.time()),
        )  # fmt: skip
        try:
            # Never early by the wall clock the publisher stamped with: a timer may fire a
            # hair before its time, so check again.
            while (wait := due_s - time.time()) > 0:  # noqa: ASYNC110 - a timer, not an event
                await asyncio.sleep(wait)
        finally:
            self._holding.discard(current)
            self.metrics.held.dec()
        return True

    async def _send_back(self, message: AbstractIncomingMessage, due_s: float) -> None:
        headers = message.headers or {}
        attempt = headers.get(ATTEMPT, 1)
        wait_us = int((due_s - time.time()) * 1e6)
        log.info(
            "task %s arrived %.1fs before it is due; sending it back through the levels",
            headers.get(TASK_ID), wait_us / 1e6,
        )  # fmt: skip
        await self._republish(
            message,
            attempt=attempt if isinstance(attempt, int) else 1,
            due_ms=round(due_s * 1000),
            wait_us=wait_us,
            what="send back",
        )

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        self._count("requeued")
        if not message.channel.is_closed:
            await message.nack(requeue=True)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            task = decode_task(
                headers=message.headers,
                body=message.body,
                content_type=message.content_type,
                routing_key=message.routing_key or "",
                redelivered=bool(message.redelivered),
                accept=self.accept,
            )
        except MessageDecodeError as e:
            log.warning("cannot decode message %s: %s; parking it", message.message_id, e)
            await self._park(message, f"undecodable: {e}", error="MessageDecodeError", attempts=0)
            return
        cancelled_by = self._follower.cancels.cancelled_by(
            (task.id, *task.keys), published_ms(task)
        )
        if cancelled_by is not None:
            # Debug only: one cancel of a busy key can skip thousands (counted, summarised).
            log.debug("task %s cancelled by %r; not run", task.id, cancelled_by)
            await message.ack()
            self._count("cancelled")
            return
        lateness, past_due = _lateness(task, time.time())
        log.debug("executing %s (attempt %d, %.0f ms late)", task.id, task.attempt, lateness * 1e3)
        self.metrics.lateness.observe(max(0.0, lateness))
        try:
            with self.metrics.in_flight.track_inprogress(), self.metrics.duration.time():
                await self._call(task)
        except Retry as e:
            await self._after_failure(message, task, "Retry", describe_failure(e)[1], e.delay)
            return
        except asyncio.CancelledError as e:
            if _being_cancelled():
                raise  # the worker is stopping: requeued by _on_message
            await self._after_failure(message, task, *describe_failure(e), None)
            return
        except BaseException as e:  # no handler may stop the worker
            await self._after_failure(message, task, *describe_failure(e), None)
            return
        await message.ack()
        self.stats.record_lateness(lateness)
        if past_due:
            self.stats.past_due += 1
            self.metrics.past_due.inc()
        self._count("executed")

    async def _call(self, task: Task) -> None:
        assert self._executor is not None
        if self.handler_timeout is None:
            await call_handler(self.handler, task, self._executor)
            return
        limit = self.handler_timeout.total_seconds()
        try:
            async with asyncio.timeout(limit) as deadline:
                await call_handler(self.handler, task, self._executor)
        except TimeoutError as e:
            if not deadline.expired():
                raise  # the handler's own TimeoutError
            raise HandlerTimeoutError(f"handler ran longer than {limit:g}s") from e

    async def _after_failure(
        self,
        message: AbstractIncomingMessage,
        task: Task,
        error: str,
        detail: str,
        delay: timedelta | float | None,
    ) -> None:
        """Retry through the delay levels, or park the task after its last attempt."""
        self._count("failed")
        policy = self.retry.for_task(task.headers)
        decision = decide(
            policy, task.attempt, error, detail, delay, self.wiring.limits, random.random()
        )
        if decision.park:
            log.warning(
                "task %s failed on its last attempt (%d): %s: %s; parking it",
                task.id, task.attempt, decision.error, decision.detail,
            )  # fmt: skip
            reason = decision.reason(task.attempt, policy.max_attempts)
            await self._park(message, reason, error=decision.error, attempts=task.attempt)
            return
        wait_us = decision.wait_us
        log.info(
            "task %s failed (attempt %d of %d): %s: %s; retrying in %.3fs",
            task.id, task.attempt, policy.max_attempts, decision.error, decision.detail,
            wait_us / 1e6,
        )  # fmt: skip
        now_us = time.time_ns() // 1000
        if await self._republish(
            message,
            attempt=task.attempt + 1,
            due_ms=-(-(now_us + wait_us) // 1000),
            wait_us=wait_us,
            what="retry",
        ):
            self._count("retried")

    async def _republish(
        self,
        message: AbstractIncomingMessage,
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
            way = self.wiring.route(wait_us)
        except InvalidDelayError as e:
            await self._park(
                message, f"InvalidDelayError: cannot {what}: {e}", error="InvalidDelayError",
                attempts=attempt - 1,
            )  # fmt: skip
            return False
        headers = rescheduled_headers(original, attempt=attempt, due_ms=due_ms, route=way.headers)
        # The task id, also for tasks other clients published without a message id.
        message_id = task_id if isinstance(task_id, str) else message.message_id
        again = properties(headers, content_type=message.content_type, message_id=message_id)
        routing_key = message.routing_key or self.destination
        await self._replace(
            message, again, way.exchange, routing_key, mandatory=way.mandatory,
            what=f"{what} of {message_id}",
        )  # fmt: skip
        return True

    async def _park(
        self, message: AbstractIncomingMessage, reason: str, *, error: str, attempts: int
    ) -> None:
        """Move a message to the parking lot with ``reason``; requeue it if that fails."""
        parked = properties(
            parked_headers(
                message.headers,
                reason=reason,
                error=error,
                attempts=attempts,
                destination=self.destination,
                now_ms=time.time_ns() // 1_000_000,
                source=self.wiring.names.work_queue(self.destination),
            ),
            content_type=message.content_type,
            message_id=message.message_id,
        )
        await self._replace(
            message, parked, self.wiring.names.parked, message.routing_key or "",
            what=f"parking of {message.message_id}",
        )  # fmt: skip
        self._count("parked")

    async def _replace(
        self,
        message: AbstractIncomingMessage,
        new: Basic.Properties,
        exchange: str,
        routing_key: str,
        *,
        mandatory: bool = True,
        what: str,
    ) -> None:
        """Publish ``message``'s body with properties ``new`` in its place (confirmed,
        through outages), then ack ``message``; if that fails, return it to the queue."""
        assert self._publisher is not None
        try:
            await self._publisher.publish(
                message.body, new, exchange, routing_key, mandatory=mandatory, what=what
            )
        except Exception as e:
            log.error("could not publish the %s (%s); returning it to the queue", what, e)
            await self._requeue(message)
            raise PublishNotConfirmedError(f"the {what} failed: {e}") from e
        if message.channel.is_closed:
            # The link dropped while publishing: the broker redelivers the original, which
            # may then run twice (delivery is at least once).
            return
        await message.ack()


def _due_s(headers: Mapping[str, Any] | None) -> float | None:
    """The due time in epoch seconds, read before decoding (None when missing or odd:
    decoding will say what is wrong)."""
    due = (headers or {}).get(DUE_MS)
    return due / 1000 if isinstance(due, int) and not isinstance(due, bool) else None


def _lateness(task: Task, now_s: float) -> tuple[float, bool]:
    """Seconds from due time to ``now_s``, and whether the task was scheduled past due.

    A task scheduled with a due time already past (beyond the tolerance) counts from its
    publish time: its lateness is the user's choice, not the pipeline's.
    """
    due_s, published_s = task.due_at.timestamp(), task.published_at.timestamp()
    if (published_s - due_s) * 1000 > PAST_DUE_TOLERANCE_MS:
        return now_s - published_s, True
    return now_s - due_s, False


def _being_cancelled() -> bool:
    """Whether the current task was cancelled (rather than handed a CancelledError)."""
    current = asyncio.current_task()
    return current is not None and current.cancelling() > 0


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
