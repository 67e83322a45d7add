"""What workers tell the dashboard: every few seconds each worker appends a record of what
it did since its last one (counts, and its lateness as a histogram) to the namespace's
stats stream; the dashboard merges the records of the last minutes per destination.

Lateness is kept in fixed buckets, not as samples, so records of any number of workers
merge by adding, and a percentile is read off the merged buckets as the bound of the
bucket it falls in ("p99 within 20 ms").
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rmqdelay.core.errors import MessageDecodeError

#: Upper bounds of the lateness buckets, in milliseconds; the last bucket is everything
#: later than the last bound.
LATENESS_BOUNDS_MS: tuple[int, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000,
)  # fmt: skip
BUCKETS = len(LATENESS_BOUNDS_MS) + 1
#: What a record counts, in this order.
COUNTED = ("executed", "failed", "retried", "parked", "cancelled")
VERSION = 1
#: Larger records are not ours: a stream anyone in the vhost may append to is input.
MAX_RECORD_BYTES = 4096


def bucket_of(lateness_ms: float) -> int:
    """The index of the bucket a lateness falls in (bounds are inclusive)."""
    return bisect.bisect_left(LATENESS_BOUNDS_MS, lateness_ms)


@dataclass(slots=True)
class Activity:
    """What one destination's workers did over a span of time."""

    executed: int = 0
    failed: int = 0
    retried: int = 0
    parked: int = 0
    cancelled: int = 0
    lateness: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    #: Workers heard from (their ids).
    workers: set[str] = field(default_factory=set)

    def add(self, other: Activity) -> None:
        """Merge ``other`` in."""
        for name in COUNTED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lateness = [a + b for a, b in zip(self.lateness, other.lateness, strict=True)]
        self.workers |= other.workers

    def percentile(self, q: float) -> int | None:
        """The bound (ms) of the bucket holding the ``q`` quantile of lateness; None when
        nothing ran, and -1 when it is past the last bound (later than a minute)."""
        total = sum(self.lateness)
        if total == 0:
            return None
        rank, seen = q * total, 0
        for index, count in enumerate(self.lateness):
            seen += count
            if seen >= rank and count:
                return LATENESS_BOUNDS_MS[index] if index < len(LATENESS_BOUNDS_MS) else -1
        return -1  # pragma: no cover: the loop always reaches the rank


@dataclass(frozen=True, slots=True)
class StatsRecord:
    """One worker's record: what it did from ``from_ms`` to ``to_ms``."""

    worker: str
    destination: str
    from_ms: int
    to_ms: int
    counts: tuple[int, ...]
    lateness: tuple[int, ...]

    def encode(self) -> bytes:
        """The record's body in the stream: JSON, readable by other tools."""
        return json.dumps(
            {
                "v": VERSION,
                "worker": self.worker,
                "destination": self.destination,
                "from_ms": self.from_ms,
                "to_ms": self.to_ms,
                **dict(zip(COUNTED, self.counts, strict=True)),
                "lateness_bounds_ms": list(LATENESS_BOUNDS_MS),
                "lateness": list(self.lateness),
            },
            separators=(",", ":"),
        ).encode()

    def activity(self) -> Activity:
        """The record as an ``Activity`` to merge."""
        activity = Activity(lateness=list(self.lateness), workers={self.worker})
        for name, count in zip(COUNTED, self.counts, strict=True):
            setattr(activity, name, count)
        return activity


def decode_record(body: bytes) -> StatsRecord:
    """A record from its body.

    Raises:
        MessageDecodeError: it is not a record of this version.
    """
    if len(body) > MAX_RECORD_BYTES:
        raise MessageDecodeError(f"stats record of {len(body)} bytes is too large")
    try:
        data: Any = json.loads(body)
    except ValueError as e:
        raise MessageDecodeError(f"stats record is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("v") != VERSION:
        raise MessageDecodeError("not a stats record of version 1")
    try:
        counts = tuple(_count(data[name]) for name in COUNTED)
        lateness = tuple(_count(n) for n in data["lateness"])
        worker, destination = data["worker"], data["destination"]
        from_ms, to_ms = _count(data["from_ms"]), _count(data["to_ms"])
    except (KeyError, TypeError) as e:
        raise MessageDecodeError(f"stats record lacks or mistypes {e}") from None
    if not isinstance(worker, str) or not isinstance(destination, str):
        raise MessageDecodeError("stats record's worker and destination must be strings")
    if len(lateness) != BUCKETS or data.get("lateness_bounds_ms") != list(LATENESS_BOUNDS_MS):
        raise MessageDecodeError("stats record has other lateness buckets")
    return StatsRecord(worker, destination, from_ms, to_ms, counts, lateness)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{value!r} is not a count")
    return value


def merge(records: Iterable[StatsRecord], since_ms: int) -> dict[str, Activity]:
    """Per destination, what the records that end after ``since_ms`` tell."""
    out: dict[str, Activity] = {}
    for record in records:
        if record.to_ms > since_ms:
            out.setdefault(record.destination, Activity()).add(record.activity())
    return out


def delta(now: Sequence[int], before: Sequence[int]) -> tuple[int, ...]:
    """What grew between two snapshots of counters."""
    return tuple(a - b for a, b in zip(now, before, strict=True))
