"""What this worker ran lately, so that a redelivery of it is not run again.

An ack is not confirmed: when a link goes silent (a cut network) the acks written to it
are lost with it, and the broker, once it gives the link up, hands every delivery it still
counts as unacked to a consumer again, flagged ``redelivered``. The worker that ran it
usually gets it back once it has reconnected. Measured on a 4.3 cluster with the clients cut
off from their node for 30 s (tests/cluster/test_partitions.py): without this, every task
run in the seconds between the cut and the broker's giving up ran twice.

A worker only knows what it ran itself: a copy handed to another worker of the fleet runs
there again (at least once, as everywhere).
"""

from __future__ import annotations

import time

#: How long a run is remembered: the broker gives a silent link up after two heartbeats
#: (RMQDELAY_HEARTBEAT, 5 s), the client after about 3.5, and reconnecting takes seconds.
KEEP_S = 120.0
#: At most this many runs are remembered (about 100 bytes each): two minutes at 800/s.
MOST = 100_000


class RecentRuns:
    """Keys of the runs of the last ``keep_s`` seconds (at most ``most`` of them)."""

    __slots__ = ("_keep_s", "_most", "_runs")

    def __init__(self, keep_s: float = KEEP_S, most: int = MOST) -> None:
        self._keep_s = keep_s
        self._most = most
        #: key -> when (time.monotonic()), oldest first: dicts keep insertion order.
        self._runs: dict[int, float] = {}

    @staticmethod
    def key(task_id: str, published_ms: int, attempt: int) -> int:
        """One copy of one attempt of a task (a rescheduled copy has a later stamp)."""
        return hash((task_id, published_ms, attempt))

    def add(self, key: int, now: float | None = None) -> None:
        """Remember a run, and forget what is too old or too many."""
        now = time.monotonic() if now is None else now
        runs = self._runs
        runs.pop(key, None)  # to the end: it is the newest now
        runs[key] = now
        oldest = now - self._keep_s
        while runs:
            first = next(iter(runs))
            if runs[first] >= oldest and len(runs) <= self._most:
                break
            del runs[first]

    def __contains__(self, key: int) -> bool:
        return key in self._runs

    def __len__(self) -> int:
        return len(self._runs)
