"""Handlers for `rmqdelay consume` subprocesses in tests: they report on stdout."""

from rmqdelay import Task


def report(task: Task) -> None:
    print(f"executed {task.id} {task.payload}", flush=True)
