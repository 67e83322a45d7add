"""Test helpers: a recording handler, a worker running in the background, queue peeking."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import uvicorn
from pydantic import SecretStr

from rmqdelay import Scheduler, Settings, Task, Worker
from rmqdelay.web.api import server_config


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the RMQDELAY_* variable that gives it (those left None out)."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, timedelta):
            text = f"{value // timedelta(microseconds=1)}us"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, SecretStr):
            text = value.get_secret_value()
        else:
            text = str(value)
        env[f"RMQDELAY_{name.upper()}"] = text
    return env


def subprocess_env(settings: Settings) -> dict[str, str]:
    """Environment for an rmqdelay subprocess: every one of these settings, none of the
    caller's own RMQDELAY_* variables, and the repo on the path (for
    tests.integration.handlers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMQDELAY_")}
    env.update(settings_env(settings), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return env


def use_in_cli(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Make ``settings`` the ones an in-process ``main([...])`` reads (its layout above all:
    a CLI with the default resolution would not fit a test namespace's topology)."""
    for key, value in subprocess_env(settings).items():
        if key.startswith("RMQDELAY_"):
            monkeypatch.setenv(key, value)


class Recorder:
    """A handler that records every execution and lets a test await a count of them."""

    def __init__(self) -> None:
        self.runs: list[tuple[Task, float]] = []
        self.counts: Counter[str] = Counter()
        self._changed = asyncio.Event()

    async def __call__(self, task: Task) -> None:
        self.runs.append((task, time.time()))
        self.counts[task.id] += 1
        self._changed.set()

    @property
    def ids(self) -> set[str]:
        return set(self.counts)

    async def wait_for(self, ids: set[str], within: float) -> None:
        """Return once every id in ``ids`` ran; fail after ``within`` seconds."""
        async with asyncio.timeout(within):
            while not ids <= self.ids:
                self._changed.clear()
                await self._changed.wait()

    def lateness_ms(self) -> dict[str, float]:
        """Lateness of the first execution of each task."""
        first: dict[str, float] = {}
        for task, ran in self.runs:
            first.setdefault(task.id, (ran - task.due_at.timestamp()) * 1000)
        return first


@contextmanager
def logged(logger: str, text: str) -> Iterator[asyncio.Event]:
    """An event set once ``logger`` (or a child) emits a record containing ``text``."""
    seen = asyncio.Event()
    loop = asyncio.get_running_loop()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                loop.call_soon_threadsafe(seen.set)

    handler, target = Watch(), logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.DEBUG)  # whatever the root logger's level happens to be
    target.addHandler(handler)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


@asynccontextmanager
async def running_worker(
    settings: Settings, destination: str, handler: Any, **kwargs: Any
) -> AsyncIterator[Worker]:
    """A worker consuming in the background for the duration of the block."""
    worker = Worker(settings, destination, handler, **kwargs)
    async with in_background(worker.run, worker.ready, "worker"):
        yield worker


@asynccontextmanager
async def in_background(
    run: Callable[[asyncio.Event], Awaitable[object]], ready: asyncio.Event, what: str
) -> AsyncIterator[None]:
    """``run(stop)`` in the background once ``ready`` is set; stopped after the block."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(run(stop))
    waiting = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiting}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiting.cancel()
        task.result()  # raises what stopped it
    assert waiting in done, f"{what} did not start within 30 s"
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def get_all(settings: Settings, queue: str, *, ack: bool = False) -> list[Any]:
    """Every message currently in ``queue`` (left in place unless ``ack``)."""
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        messages = []
        while (message := await q.get(fail=False)) is not None:
            messages.append(message)
        for message in messages:
            await (message.ack() if ack else message.nack(requeue=True))
        return messages


async def depth(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        assert q.declaration_result.message_count is not None
        return q.declaration_result.message_count


async def strand(scheduler: Scheduler, destination: str, count: int) -> None:
    """Delete ``destination``'s work queue under the tasks scheduled for it and wait until
    ``count`` of them have reached the unroutable queue (there is no event to await)."""
    names = scheduler.settings.names
    channel = await scheduler.connection.channel()
    await channel.queue_delete(names.work_queue(destination))
    async with asyncio.timeout(30):
        while await depth(scheduler.settings, names.unroutable) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def eventually(condition: Any, within: float, what: str) -> None:
    """Poll ``condition()`` until true: for state spread over several workers, where no
    single ``Worker.wait_for`` covers it."""
    try:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 - see the docstring
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what}") from None


async def kill_a_worker_mid_handler(settings: Settings, destination: str) -> str:
    """Run ``rmqdelay consume`` with a handler that blocks, SIGKILL it once it has started
    a task, and return that task's id: the task is left unacked, for the broker to
    redeliver."""
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", "consume", destination,
        "--handler", "tests.integration.handlers:hang",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=subprocess_env(settings),
    )  # fmt: skip
    assert doomed.stdout is not None
    try:
        line = (await asyncio.wait_for(doomed.stdout.readline(), 30)).decode().split()
        assert line[:1] == ["started"], line
        return line[1]
    finally:
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()


class Server:
    """The API on a free loopback port, its event loop in a thread of its own (as uvicorn
    runs it in production), so that tests of any kind can call it over HTTP."""

    def __init__(self, settings: Settings) -> None:
        self.server = uvicorn.Server(server_config(settings, "127.0.0.1", 0))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            self.thread.join(0.05)
            assert self.thread.is_alive(), "the server stopped while starting"
        assert self.server.started, "the server did not start within 30 s"
        [server] = self.server.servers
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
