"""What is due when, from what the queues hold. Pure.

A task never says its due time to a queue count, but where it waits bounds it. In level
``k`` it stays at most that level's TTL (``2^k`` units), then passes only through lower
levels (less than ``2^k`` units in all) and is held by a worker for less than one unit:
it is due within ``2^(k+1)`` units from now, and it may be due much sooner. In a work
queue, or held by a worker, a task is due within one unit, or already due. (With a hold
window W wider than a unit, read W for the last unit of each bound.)

So each count is placed in the first window whose end is at or after that bound: a task
counted under "minute" is due within a minute (perhaps within a second); none is due
later than its window says.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The windows, by their end in seconds from now (the last has none).
WINDOWS: tuple[tuple[str, float], ...] = (
    ("second", 1.0),
    ("minute", 60.0),
    ("hour", 3600.0),
    ("day", 86400.0),
    ("week", 604800.0),
    ("later", float("inf")),
)


@dataclass(slots=True)
class Window:
    """Tasks due by the end of one window."""

    name: str
    #: Seconds from the sample to the window's end (None for "later").
    ends_s: float | None
    #: Waiting in delay levels.
    in_levels: int = 0
    #: In work queues, not yet taken by a worker (due, or due within a unit).
    ready: int = 0
    #: Taken by workers: held until due (they arrive up to a unit early) or running.
    held_or_running: int = 0

    @property
    def total(self) -> int:
        """All of the above."""
        return self.in_levels + self.ready + self.held_or_running


def window_of(seconds: float) -> int:
    """The index of the first window that ends at or after ``seconds``."""
    return next(i for i, (_, end) in enumerate(WINDOWS) if seconds <= end)


def level_bound_s(level: int, resolution_ms: int, hold_window_s: float | None = None) -> float:
    """The latest a task waiting in ``level`` can be due, in seconds from now: at most
    ``2^level`` units there, less than as many in the levels below, then held for at
    most the hold window (default: one unit)."""
    held_s = resolution_ms / 1000 if hold_window_s is None else hold_window_s
    return ((1 << (level + 1)) - 1) * resolution_ms / 1000 + held_s


def windows(
    levels: list[tuple[int, int]],
    work: list[tuple[int, int]],
    resolution_ms: int,
    hold_window_s: float | None = None,
) -> list[Window]:
    """Count ``levels`` ((level, tasks) pairs, shards summed or not) and ``work`` queues
    ((ready, unacked) pairs) into the windows."""
    held_s = resolution_ms / 1000 if hold_window_s is None else hold_window_s
    out = [Window(name, None if end == float("inf") else end) for name, end in WINDOWS]
    for level, count in levels:
        out[window_of(level_bound_s(level, resolution_ms, held_s))].in_levels += count
    near = out[window_of(held_s)]
    for ready, unacked in work:
        near.ready += ready
        near.held_or_running += unacked
    return out
