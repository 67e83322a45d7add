"""A blocking face on :class:`Scheduler` for synchronous programs (Flask, Django, scripts).

One event loop runs in a daemon thread and holds one long-lived connection; each call
hands its coroutine to that loop and blocks on the result. So threads share one
connection and their publisher confirms pipeline on one channel, as concurrent
``schedule()`` calls do in asyncio, instead of paying a connect (~130 ms) per call.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

from rmqdelay.broker.scheduler import Scheduler, TaskSpec
from rmqdelay.core.recurrence import Series
from rmqdelay.core.task import Cancellation, PendingTask, ScheduledTask, TaskPage
from rmqdelay.settings import Settings

T = TypeVar("T")


class SyncScheduler:
    """Schedules tasks from synchronous code; safe to share between threads.

    ``with SyncScheduler(Settings()) as scheduler: scheduler.schedule(...)``, or create
    one per process and let the first call connect (``close()`` at exit). The methods,
    errors and guarantees are :class:`Scheduler`'s: each returns only once the broker
    has confirmed.

    After ``os.fork()`` the child starts a connection of its own on first use (the
    parent's thread does not exist there), so a pre-forking server may create the client
    at import time.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self._lock = threading.Lock()
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._scheduler: Scheduler | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Connect now rather than on the first call; a second call does nothing.

        Raises:
            BrokerUnavailableError: no connection within the connect timeout.
            TopologyMismatchError: the broker's topology is not the one the settings need.
        """
        self._running()

    def close(self) -> None:
        """Close the connection and stop the thread; schedules that returned are safe."""
        with self._lock:
            loop, thread, scheduler = self._loop, self._thread, self._scheduler
            owned = self._pid == os.getpid()
            self._loop = self._thread = self._scheduler = None
            self._pid = 0
        if loop is None or thread is None or not owned:
            return
        try:
            if scheduler is not None:
                asyncio.run_coroutine_threadsafe(scheduler.close(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def declare_destination(self, destination: str) -> None:
        """Create ``destination``'s work queue (see :meth:`Scheduler.declare_destination`)."""
        self._call(lambda s: s.declare_destination(destination))

    def schedule(
        self,
        destination: str,
        payload: Any,
        *,
        delay: timedelta | float | None = None,
        at: datetime | None = None,
        content_type: str | None = None,
        task_id: str | None = None,
        keys: Iterable[str] = (),
        replace: bool = False,
        max_attempts: int | None = None,
        backoff_base: timedelta | float | None = None,
        backoff_cap: timedelta | float | None = None,
    ) -> ScheduledTask:
        """Schedule ``payload`` for ``destination``; see :meth:`Scheduler.schedule`."""
        keys = tuple(keys)  # an iterator must not be consumed on another thread
        return self._call(
            lambda s: s.schedule(
                destination,
                payload,
                delay=delay,
                at=at,
                content_type=content_type,
                task_id=task_id,
                keys=keys,
                replace=replace,
                max_attempts=max_attempts,
                backoff_base=backoff_base,
                backoff_cap=backoff_cap,
            )
        )

    def schedule_many(self, tasks: Iterable[TaskSpec]) -> list[ScheduledTask]:
        """Schedule a batch; see :meth:`Scheduler.schedule_many`."""
        batch = list(tasks)
        return self._call(lambda s: s.schedule_many(batch))

    def cancel(
        self,
        key: str,
        *,
        until: datetime | timedelta | float | None = None,
        count: bool = False,
    ) -> Cancellation:
        """Call off every task under ``key``; see :meth:`Scheduler.cancel`."""
        return self._call(lambda s: s.cancel(key, until=until, count=count))

    def follow_journal(self, *, wait: bool = False) -> None:
        """Answer lookups from memory from now on; see :meth:`Scheduler.follow_journal`."""
        return self._call(lambda s: s.follow_journal(wait=wait))

    def get(self, task_id: str) -> PendingTask | None:
        """The pending task with this id, or None; see :meth:`Scheduler.get`."""
        return self._call(lambda s: s.get(task_id))

    def find(
        self,
        *,
        key: str | None = None,
        destination: str | None = None,
        due_before: datetime | None = None,
        due_after: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of pending tasks, soonest due first; see :meth:`Scheduler.find`."""
        return self._call(
            lambda s: s.find(
                key=key,
                destination=destination,
                due_before=due_before,
                due_after=due_after,
                limit=limit,
                cursor=cursor,
            )
        )

    def reschedule(
        self, key_or_id: str, *, delay: timedelta | float | None = None, at: datetime | None = None
    ) -> ScheduledTask:
        """Move a pending task to a new due time; see :meth:`Scheduler.reschedule`."""
        return self._call(lambda s: s.reschedule(key_or_id, delay=delay, at=at))

    def recurring(
        self,
        destination: str,
        payload: Any,
        *,
        key: str,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str | None = None,
        catch_up: str = "once",
        content_type: str | None = None,
    ) -> Series:
        """Add or replace a recurring series; see :meth:`Scheduler.recurring`."""
        return self._call(
            lambda s: s.recurring(
                destination,
                payload,
                key=key,
                cron=cron,
                every=every,
                tz=tz,
                catch_up=catch_up,
                content_type=content_type,
            )
        )

    def series(self) -> list[Series]:
        """The recurring series; see :meth:`Scheduler.series`."""
        return self._call(lambda s: s.series())

    def remove_series(self, key: str) -> Cancellation:
        """Stop a series and drop it from the list; see :meth:`Scheduler.remove_series`."""
        return self._call(lambda s: s.remove_series(key))

    def _call(self, call: Callable[[Scheduler], Coroutine[Any, Any, T]]) -> T:
        loop, scheduler = self._running()
        coroutine = call(scheduler)
        # Every call is bounded by the scheduler's own deadlines (connect, publish), so
        # waiting without a timeout here cannot hang past them.
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def _running(self) -> tuple[asyncio.AbstractEventLoop, Scheduler]:
        with self._lock:
            if self._pid == os.getpid() and self._loop is not None and self._scheduler:
                return self._loop, self._scheduler
            # Not started, or started in the parent of a fork: that thread is not here.
            loop = asyncio.new_event_loop()
            ready: Future[None] = Future()
            thread = threading.Thread(
                target=_run_loop, args=(loop, ready), name="rmqdelay-sync", daemon=True
            )
            thread.start()
            ready.result()
            scheduler = Scheduler(self.settings)
            try:
                asyncio.run_coroutine_threadsafe(scheduler.start(), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._loop, self._thread, self._scheduler = loop, thread, scheduler
            self._pid = os.getpid()
            return loop, scheduler


def _run_loop(loop: asyncio.AbstractEventLoop, ready: Future[None]) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set_result, None)
    loop.run_forever()
