"""Handlers for `rmqdelay consume` subprocesses in tests: they report on stdout, a whole
line per write (print() writes a line and its newline separately, and plain handlers run
in threads: two lines could interleave)."""

import sys

from rmqdelay import Task


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report(task: Task) -> None:
    _say(f"executed {task.id} {task.payload}")


def hang(task: Task) -> None:
    """Announce the task, then block until the process is killed."""
    _say(f"started {task.id}")
    import threading

    threading.Event().wait()


def exit_unless_good(task: Task) -> None:
    """Call sys.exit(3) for every task but those whose payload is "good"."""
    if task.payload != "good":
        sys.exit(3)
    _say(f"executed {task.id} {task.payload}")
