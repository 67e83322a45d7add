"""Finding a handler from ``module:function`` and calling it, async or plain."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
from concurrent.futures import Executor
from typing import Any, cast

from rmqdelay.errors import ConfigError
from rmqdelay.task import Handler, Task


def load_handler(spec: str) -> Handler:
    """Import ``package.module:function`` (or ``module:Class.method``-style attribute paths)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"handler {spec!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"handler {spec!r}: cannot import module {module_name!r}: {e}") from e
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


async def call_handler(handler: Handler, task: Task, executor: Executor) -> None:
    """Await an async handler; run a plain one in ``executor`` so it cannot block the loop."""
    if is_async(handler):
        result = handler(task)
    else:
        result = await asyncio.get_running_loop().run_in_executor(executor, handler, task)
    if inspect.isawaitable(result):
        await result


def log_task(task: Task) -> None:
    """A handler that only logs each task: for trying a worker out (docker-compose.yml)."""
    logging.getLogger("rmqdelay.handler").info(
        "task %s for %s (attempt %d, due %s): %r",
        task.id,
        task.destination,
        task.attempt,
        task.due_at.isoformat(),
        task.payload,
    )
