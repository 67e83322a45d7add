"""Handlers for `rmqdelay consume` subprocesses in tests: they report on stdout."""

from rmqdelay import Task


def report(task: Task) -> None:
    print(f"executed {task.id} {task.payload}", flush=True)


def hang(task: Task) -> None:
    """Announce the task, then block until the process is killed."""
    print(f"started {task.id}", flush=True)
    import threading

    threading.Event().wait()


def exit_unless_good(task: Task) -> None:
    """Call sys.exit(3) for every task but those whose payload is "good"."""
    import sys

    if task.payload != "good":
        sys.exit(3)
    print(f"executed {task.id} {task.payload}", flush=True)
