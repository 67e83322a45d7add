"""Finding a handler from ``module:function`` and calling it, async or plain."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, cast

from rmqdelay.core.errors import ConfigError, HandlerError
from rmqdelay.core.task import Handler, Task

log = logging.getLogger(__name__)


def load_handler(spec: str) -> Handler:
    """Import ``package.module:function`` (or ``module:Class.method``-style attribute paths)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"handler {spec!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"handler {spec!r}: no module named {e.name!r} on the import path (the current "
            "folder and PYTHONPATH): run from the folder that holds it, or set PYTHONPATH"
        ) from e
    except (Exception, SystemExit) as e:  # a module may fail (or even exit) as it loads
        raise ConfigError(
            f"handler {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise ConfigError(f"handler {spec!r}: {module_name!r} has no {attr_path!r}") from e
    if not callable(target):
        raise ConfigError(f"handler {spec!r} is a {type(target).__name__}, not a callable")
    return cast(Handler, target)


def is_async(handler: Handler) -> bool:
    """Whether calling ``handler`` gives a coroutine to await (functions or callable objects)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - looking for an async __call__
    )


def prepare(handler: Handler, executor: Executor) -> Callable[[Task], Awaitable[None]]:
    """``handler`` as a coroutine function: an async one awaited, a plain one run in
    ``executor`` so it cannot block the loop (decided once, not per task).

    The returned function raises whatever the handler raised (``SystemExit`` included),
    and HandlerError when a plain handler returned a coroutine (or other awaitable): it
    would never run, so the attempt has failed.
    """
    if is_async(handler):
        # Awaited as it is: no wrapper frame on every task.
        return cast(Callable[[Task], Awaitable[None]], handler)

    async def call_plain(task: Task) -> None:
        running = executor.submit(handler, task)
        try:
            result = await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            if running.running():
                # Stopped at a timeout (its task is retried) or at the worker's stop: a
                # thread cannot be interrupted, and may still be doing the task's work.
                log.warning(
                    "the plain (def) handler %s is still running task %s in its thread after "
                    "the worker stopped waiting for it; its task may run again meanwhile. "
                    "Make it 'async def' to be stopped, or finish within the timeouts",
                    _name(handler), task.id,
                )  # fmt: skip
            raise
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if callable(close):
                close()  # no "never awaited" warning on top of the error
            raise HandlerError(
                f"the plain (def) handler {_name(handler)} returned a {type(result).__name__} "
                "instead of running it; make the handler 'async def' so the worker awaits it"
            )

    return call_plain


#: Longest exception text kept for logs and the parking lot.
MAX_DETAIL = 1000


def describe_failure(error: BaseException) -> tuple[str, str]:
    """``(error type, detail)`` for anything a handler raised, safe to log and park.

    Never raises, even for an exception whose ``__str__`` does; ``SystemExit`` and the
    like are named as such, since a handler cannot stop the worker with them.
    """
    name = type(error).__name__
    if isinstance(error, SystemExit):
        return (
            name,
            f"the handler raised SystemExit({error.code!r}) (sys.exit?); it cannot stop the worker",
        )
    if isinstance(error, KeyboardInterrupt):
        return name, "the handler raised KeyboardInterrupt; it cannot stop the worker"
    if isinstance(error, asyncio.CancelledError):
        return name, (
            "the handler raised asyncio.CancelledError without being cancelled "
            "(a library's timeout?)"
        )
    try:
        detail = str(error)
    except BaseException:  # an exception's own __str__ may fail
        detail = f"(str() of the {name} failed)"
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - 1] + "…"
    return name, detail


def _name(handler: Handler) -> str:
    return str(getattr(handler, "__qualname__", None) or type(handler).__qualname__)


def log_task(task: Task) -> None:
    """A handler that only logs each task: for trying a worker out (docker-compose.yml)."""
    logging.getLogger("rmqdelay.worker.handler").info(
        "task %s for %s (attempt %d, due %s): %r",
        task.id,
        task.destination,
        task.attempt,
        task.due_at.isoformat(),
        task.payload,
    )
