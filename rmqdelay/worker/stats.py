"""What a worker counts, and waiting on the counts (tests, the demo, the CLI's exit code)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from prometheus_client import Counter

from rmqdelay.core.workstats import BUCKETS, COUNTED, bucket_of
from rmqdelay.worker.metrics import WorkerMetrics

Outcome: TypeAlias = Literal[
    "executed",
    "failed",
    "retried",
    "parked",
    "cancelled",
    "requeued",
    "skipped",
    "backlogged",
    "repeated",
]


@dataclass(slots=True)
class WorkerStats:
    """Counts since the worker started."""

    executed: int = 0
    failed: int = 0
    retried: int = 0
    parked: int = 0
    cancelled: int = 0
    requeued: int = 0
    #: Occurrences of a recurring series passed over after downtime (catch-up ``skip``).
    skipped: int = 0
    #: Executed tasks that were scheduled with a due time already well past (``at=`` in
    #: the past): their lateness counts from their publish time instead.
    past_due: int = 0
    #: Tasks that arrived before their due time and were held until it.
    held: int = 0
    #: Tasks handed back (a fresh copy at the queue's tail) after waiting
    #: ``Worker.max_unacked_s`` for a free slot: a backlog, not a failure.
    backlogged: int = 0
    #: Redeliveries of copies this worker had run already (the ack was lost with a link
    #: that went silent), acked without running again.
    repeated: int = 0
    #: Handlers still running when the worker gave up on them at stop (tasks requeued).
    abandoned: int = 0
    #: Handlers still running past the broker's consumer timeout: the broker took their
    #: task back and may have run it elsewhere meanwhile (each said at ERROR).
    overran: int = 0
    lateness_max_s: float = 0.0
    lateness_total_s: float = 0.0
    #: Executions by lateness, in the buckets of ``core/workstats.py``.
    lateness_buckets: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def record_lateness(self, seconds: float) -> None:
        """Account one execution that started ``seconds`` after its due time."""
        self.lateness_max_s = max(self.lateness_max_s, seconds)
        self.lateness_total_s += seconds
        self.lateness_buckets[bucket_of(seconds * 1000)] += 1

    def counted(self) -> tuple[int, ...]:
        """The counts a stats record carries, in ``COUNTED`` order."""
        return tuple(getattr(self, name) for name in COUNTED)

    def summary(self) -> str:
        """One line for the log."""
        mean_ms = 1000 * self.lateness_total_s / self.executed if self.executed else 0.0
        return (
            f"executed {self.executed}, failed {self.failed}, retried {self.retried}, "
            f"cancelled {self.cancelled}, "
            f"parked {self.parked}, "
            f"requeued {self.requeued}, "
            + (f"skipped {self.skipped}, " if self.skipped else "")
            + (f"handed back from a backlog {self.backlogged}, " if self.backlogged else "")
            + (f"not run again after a lost ack {self.repeated}, " if self.repeated else "")
            + f"scheduled past due {self.past_due}"
            + (f", abandoned {self.abandoned}" if self.abandoned else "")
            + (f", overran the consumer timeout {self.overran}" if self.overran else "")
            + "; "
            f"lateness mean {mean_ms:.0f} ms, max {1000 * self.lateness_max_s:.0f} ms"
        )


class Tally:
    """Counts outcomes into the stats and the metrics, and wakes whoever waits on them."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.stats = WorkerStats()
        self.metrics = metrics
        self._changed = asyncio.Event()
        self._executed: Counter = metrics.executed
        self._counters: dict[str, Counter] = {
            outcome: getattr(metrics, outcome)
            for outcome in ("executed", "failed", "retried", "parked", "cancelled", "repeated")
        }

    def count(self, outcome: Outcome) -> None:
        """One more task with ``outcome`` (a requeue is counted, not exported: it is not an
        outcome of the task)."""
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        counter = self._counters.get(outcome)
        if counter is not None:
            counter.inc()
        self._changed.set()

    def executed(self, lateness_s: float, past_due: bool) -> None:
        """A handler returned; its task started ``lateness_s`` after it was due (the
        per-task path: no lookups by name)."""
        stats = self.stats
        stats.executed += 1
        stats.record_lateness(lateness_s)
        self._executed.inc()
        if past_due:
            stats.past_due += 1
            self.metrics.past_due.inc()
        self._changed.set()

    def held(self) -> None:
        """A task arrived early and is held until it is due."""
        self.stats.held += 1
        self._changed.set()

    async def wait_for(self, condition: Callable[[WorkerStats], bool]) -> WorkerStats:
        """Return once ``condition(stats)`` holds, re-checked whenever a task is counted."""
        while not condition(self.stats):
            self._changed.clear()
            await self._changed.wait()
        return self.stats
