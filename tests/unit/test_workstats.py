"""Worker stats records: encoding, the refusal of what is not one, merging, percentiles."""

from __future__ import annotations

import json

import pytest

from rmqdelay.core.errors import MessageDecodeError
from rmqdelay.core.workstats import (
    BUCKETS,
    LATENESS_BOUNDS_MS,
    Activity,
    StatsRecord,
    bucket_of,
    decode_record,
    merge,
)
from rmqdelay.worker.report import Reporter
from rmqdelay.worker.stats import WorkerStats


def record(
    destination: str = "d", worker: str = "w", to_ms: int = 2000, **counts: int
) -> StatsRecord:
    lateness = [0] * BUCKETS
    lateness[bucket_of(counts.pop("late_ms", 3))] = counts.get("executed", 0)
    names = ("executed", "failed", "retried", "parked", "cancelled")
    return StatsRecord(
        worker, destination, 1000, to_ms, tuple(counts.get(n, 0) for n in names), tuple(lateness)
    )


@pytest.mark.parametrize(
    ("late_ms", "bucket"),
    [(0, 0), (1, 0), (1.5, 1), (2, 1), (20, 4), (20.1, 5), (60_000, 14), (60_001, 15), (1e9, 15)],
)
def test_a_lateness_falls_in_the_bucket_its_bound_closes(late_ms: float, bucket: int) -> None:
    assert bucket_of(late_ms) == bucket


def test_a_record_reads_back_as_written() -> None:
    written = record(executed=7, failed=2, parked=1, late_ms=40)
    assert decode_record(written.encode()) == written
    assert json.loads(written.encode())["lateness_bounds_ms"] == list(LATENESS_BOUNDS_MS)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"not json", "not JSON"),
        (b"[]", "version 1"),
        (b'{"v": 2}', "version 1"),
        (b'{"v": 1}', "lacks"),
        (b"x" * 5000, "too large"),
    ],
)
def test_what_is_not_a_record_is_refused_saying_why(body: bytes, why: str) -> None:
    with pytest.raises(MessageDecodeError, match=why):
        decode_record(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [("executed", -1), ("executed", True), ("executed", "3"), ("worker", 5), ("lateness", [1])],
)
def test_a_record_with_a_bad_field_is_refused(field: str, value: object) -> None:
    data = json.loads(record(executed=1).encode())
    data[field] = value
    with pytest.raises(MessageDecodeError):
        decode_record(json.dumps(data).encode())


def test_records_merge_per_destination_and_only_recent_ones() -> None:
    merged = merge(
        [
            record("a", "w1", executed=3, late_ms=5),
            record("a", "w2", executed=1, failed=1, late_ms=500),
            record("b", "w1", parked=2),
            record("a", "w3", to_ms=900, executed=100),  # ended before the span
        ],
        since_ms=1000,
    )
    assert set(merged) == {"a", "b"}
    a = merged["a"]
    assert (a.executed, a.failed, a.workers) == (4, 1, {"w1", "w2"})
    assert a.percentile(0.5) == 5
    assert a.percentile(0.99) == 500
    assert merged["b"].percentile(0.5) is None
    assert merged["b"].parked == 2


def test_percentiles_past_the_last_bound_say_so() -> None:
    activity = Activity()
    activity.lateness[-1] = 1
    assert activity.percentile(0.99) == -1


def test_a_reporter_writes_differences_and_carries_on_after_a_lost_record() -> None:
    stats = WorkerStats()
    reporter = Reporter(stats, "d", "ns.stats")
    stats.executed += 2
    stats.record_lateness(0.004)
    stats.record_lateness(0.004)
    lost = reporter.record(5000)  # never written: the next record must still count it
    assert lost.counts[0] == 2
    stats.failed += 1
    second = reporter.record(10_000)
    assert second.counts[:2] == (2, 1)
    assert sum(second.lateness) == 2
    reporter.written(second)
    stats.executed += 1
    third = reporter.record(15_000)
    assert (third.counts[:2], third.from_ms) == ((1, 0), 10_000)
