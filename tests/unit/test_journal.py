"""The pending view built from journal records, cursors and export lines: pure, no broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from rmqdelay.core.cancelset import CancelSet
from rmqdelay.core.errors import MessageDecodeError
from rmqdelay.core.journal import (
    Entry,
    Keeping,
    Query,
    TaskIndex,
    carried_headers,
    decode_cursor,
    decode_entry,
    decode_value,
    encode_cursor,
    encode_value,
    journaled_ms,
    read_line,
    task_line,
)
from rmqdelay.core.recurrence import SERIES, Rule, SeriesHeader
from rmqdelay.core.wire import (
    JOURNAL_DESTINATION,
    JOURNALED_MS,
    KEYS,
    KEYS_JSON,
    PUBLISHED_MS,
    keys_from_json,
    task_headers,
)

NOW = 1_800_000_000_000


def entry(
    task_id: str = "t1",
    *,
    due: int = NOW + 60_000,
    stamp: int = NOW - 1000,
    keys: tuple[str, ...] = (),
    attempt: int = 1,
    destination: str = "alarms",
    extra: dict[str, Any] | None = None,
) -> Entry:
    headers = task_headers(
        task_id,
        due_ms=due,
        published_ms=stamp,
        route={"rmqdelay-route-in": "3", "rmqdelay-route-3": "work"},
        attempt=attempt,
        keys=keys,
    )
    headers.update(extra or {})
    headers.pop(KEYS, None)  # as a stream delivers it: the array gone, its JSON copy not
    return decode_entry(
        headers={**headers, "x-stream-offset": 7},
        body=b'{"a":1}',
        routing_key=destination,
        content_type="application/json",
        properties={"message_id": task_id, "correlation_id": "c", "bogus": 1},
    )


def index_of(*entries: Entry, cancels: CancelSet | None = None) -> TaskIndex:
    index = TaskIndex(cancels if cancels is not None else CancelSet(10**12))
    for e in entries:
        index.add(e)
    return index


def test_an_entry_has_its_keys_back_from_the_json_copy_and_loses_route_and_offset() -> None:
    e = entry(keys=("incident:42", "ünï"))
    assert e.keys == ("incident:42", "ünï")
    assert "rmqdelay-route-in" not in e.headers
    assert "x-stream-offset" not in e.headers
    assert e.properties == {"message_id": "t1", "correlation_id": "c"}  # publisher's only
    assert (e.destination, e.due_ms, e.attempt) == ("alarms", NOW + 60_000, 1)


def test_a_record_that_is_not_a_task_is_refused() -> None:
    with pytest.raises(MessageDecodeError):
        decode_entry(headers={}, body=b"", routing_key="x", content_type=None, properties={})
    with pytest.raises(MessageDecodeError, match="must be a JSON array"):
        keys_from_json({KEYS_JSON: "not json"})


def test_pending_is_due_in_the_future_and_not_cancelled() -> None:
    cancels = CancelSet(10**12)
    cancels.add("gone", NOW - 500, NOW)
    index = index_of(
        entry("due-later"),
        entry("past", due=NOW - 1),
        entry("cancelled-by-id", stamp=NOW - 1000),
        entry("cancelled-by-key", keys=("gone",)),
        entry("after-the-cancel", keys=("gone",), stamp=NOW - 100),
        cancels=cancels,
    )
    cancels.add("cancelled-by-id", NOW - 1000, NOW)
    assert [e.id for e in index.pending(NOW)] == ["after-the-cancel", "due-later"]
    assert index.get("past", NOW) is None
    assert index.get("due-later", NOW) is not None


def test_the_newest_copy_by_stamp_wins_whatever_the_order() -> None:
    old = entry("t", due=NOW + 10_000, stamp=NOW - 5000)
    moved = entry("t", due=NOW + 90_000, stamp=NOW - 10)
    retry = entry("t", due=NOW + 95_000, stamp=NOW - 10, attempt=2)
    # The old copy sent back through the levels after the reschedule: still behind.
    index = index_of(old, moved, old, retry)
    found = index.get("t", NOW)
    assert found is not None
    assert (found.due_ms, found.attempt) == (NOW + 95_000, 2)
    assert index.copy_of("t", NOW - 10)
    assert not index.copy_of("t", NOW - 9)


def test_a_series_occurrence_is_stopped_by_its_series_key_from_the_series_start() -> None:
    header = SeriesHeader("beat", Rule(None, 60_000, "UTC", NOW), "once", NOW - 100_000)
    occurrence = entry("occ", stamp=NOW - 10, extra={SERIES: header.encode()})
    cancels = CancelSet(10**12)
    index = index_of(occurrence, cancels=cancels)
    assert index.get("occ", NOW) is not None
    cancels.add("beat", NOW - 50_000, NOW)  # before this copy's stamp, after the start
    assert index.get("occ", NOW) is None


def test_find_filters_and_pages_in_due_order() -> None:
    entries = [
        entry(f"t{i}", due=NOW + 1000 * (10 - i), keys=("k",) if i % 2 else ()) for i in range(10)
    ]
    index = index_of(*entries, entry("elsewhere", destination="other"))
    page, cursor = index.find(NOW, Query(limit=4))
    assert [e.id for e in page] == ["t9", "t8", "t7", "t6"]
    seen = [e.id for e in page]
    while cursor is not None:
        page, cursor = index.find(NOW, Query(limit=4, cursor=cursor))
        seen += [e.id for e in page]
    assert seen == [f"t{i}" for i in range(9, -1, -1)] + ["elsewhere"]
    assert [e.id for e in index.pending(NOW, Query(key="k"))] == ["t9", "t7", "t5", "t3", "t1"]
    assert [e.id for e in index.pending(NOW, Query(key="t4"))] == ["t4"]  # an id is a key
    assert [e.id for e in index.pending(NOW, Query(destination="other"))] == ["elsewhere"]
    window = Query(due_after_ms=NOW + 3000, due_before_ms=NOW + 5000)
    assert [e.id for e in index.pending(NOW, window)] == ["t7", "t6"]
    with pytest.raises(ValueError, match="limit must be 1 to 1000"):
        index.find(NOW, Query(limit=1001))


def test_cursors_round_trip_and_a_forged_one_is_refused() -> None:
    assert decode_cursor(encode_cursor(NOW, "ünï/id")) == (NOW, "ünï/id")
    for bad in ("", "!!", encode_cursor(NOW, "x")[:-3], "WzEsMl0"):  # [1,2]
        with pytest.raises(ValueError, match="is not one a listing returned"):
            decode_cursor(bad)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        7,
        -(2**62),
        1.5,
        float("inf"),
        "text ünï",
        b"\x00\xff",
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        Decimal("1.25"),
        ["a", 1, [b"x"]],
        {"nested": {"$bytes": "looks like a tag"}},
    ],
)
def test_header_values_survive_an_export_exactly(value: Any) -> None:
    back = decode_value(json.loads(json.dumps(encode_value(value))))
    assert back == value
    assert type(back) is type(value)


def test_an_export_line_reads_back_as_the_same_entry() -> None:
    e = entry(
        keys=("incident:42",),
        attempt=3,
        extra={"tenant": "acme", "when": datetime(2026, 1, 1, tzinfo=UTC)},
    )
    back = read_line(json.dumps(task_line(e)), 2).entry
    assert back is not None
    assert back == e.__class__(**{**{f: getattr(e, f) for f in e.__slots__}, "offset": 0})


def test_a_bad_export_line_names_its_number_and_fault() -> None:
    with pytest.raises(ValueError, match="line 5: "):
        read_line("not json", 5)
    with pytest.raises(ValueError, match="line 6: not an export line"):
        read_line('{"kind": "task"}', 6)
    with pytest.raises(ValueError, match="line 7: unknown kind"):
        read_line('{"kind": "other"}', 7)
    with pytest.raises(ValueError, match="line 8: not an exported value"):
        read_line(json.dumps({**task_line(entry()), "headers": {"x": {"$nope": 1}}}), 8)


def test_a_live_index_keeps_slim_entries_and_forgets_tasks_long_past_due() -> None:
    index = index_of(
        entry("old", due=NOW - 7_200_000, keys=("k",)).slim(),
        entry("new", due=NOW + 1000, keys=("k",)).slim(),
    )
    found = index.get("new", NOW)
    assert found is not None
    assert (found.whole, found.body, found.size) == (False, b"", 7)  # the size survives
    assert index.prune(NOW - 3_600_000) == 1
    assert [e.id for e in index.all()] == ["new"]
    assert [e.id for e in index.pending(NOW, Query(key="k"))] == ["new"]


def test_a_page_skips_cancelled_tasks_however_many_come_first() -> None:
    """Pages are cut from the smallest due times; cancelled ones among them widen the cut."""
    cancels = CancelSet(10**12)
    index = index_of(*(entry(f"t{i:03}", due=NOW + i) for i in range(1, 301)), cancels=cancels)
    for i in range(1, 251):
        cancels.add(f"t{i:03}", NOW, NOW)
    page, cursor = index.find(NOW, Query(limit=10))
    assert [e.id for e in page] == [f"t{i:03}" for i in range(251, 261)]
    assert cursor is not None


DAY_MS = 86_400_000


@pytest.mark.parametrize(
    ("retention_ms", "every_ms"),
    [(7 * DAY_MS, 600_000), (DAY_MS, 600_000), (40_000, 5000), (4000, 1000)],
)
def test_a_keeper_passes_an_eighth_of_the_retention_apart_within_bounds(
    retention_ms: int, every_ms: int
) -> None:
    keeping = Keeping(retention_ms)
    assert keeping.every_ms == every_ms
    assert keeping.lookback_ms == 3 * every_ms + 60_000
    assert keeping.through_ms(NOW) == NOW - retention_ms // 2
    # A record is read by the first pass after it is half the retention old: it is carried
    # before it can expire, with a pass to spare.
    assert retention_ms // 2 + 2 * keeping.every_ms <= retention_ms


def test_a_record_is_carried_only_if_it_could_expire_before_its_task_is_due() -> None:
    keeping = Keeping(8 * DAY_MS)  # carried if due more than 6 days after it was written
    written = NOW - 4 * DAY_MS
    assert keeping.must_carry(written + 6 * DAY_MS + 1, written)
    assert not keeping.must_carry(written + 6 * DAY_MS, written)
    assert not keeping.must_carry(NOW + 60_000, written)


def test_when_a_record_was_journaled_comes_from_its_copy_or_its_stamp() -> None:
    assert journaled_ms({PUBLISHED_MS: NOW}) == NOW
    assert journaled_ms({PUBLISHED_MS: NOW, JOURNALED_MS: NOW + 5}) == NOW + 5
    assert journaled_ms({}) is None
    assert journaled_ms({PUBLISHED_MS: NOW // 1000}) is None  # seconds: not a task record
    assert journaled_ms({PUBLISHED_MS: "soon"}) is None


def test_a_carried_copy_reads_back_as_the_same_task_with_its_destination() -> None:
    original = entry(keys=("incident:42",))
    headers = task_headers(
        "t1",
        due_ms=original.due_ms,
        published_ms=original.published_ms,
        route={"rmqdelay-route-in": "3"},
        attempt=1,
        keys=("incident:42",),
    )
    headers.pop(KEYS)
    carried = carried_headers({**headers, "x-stream-offset": 7}, "alarms", NOW)
    assert carried[JOURNAL_DESTINATION] == "alarms"
    assert carried[JOURNALED_MS] == NOW
    assert "x-stream-offset" not in carried
    copy = decode_entry(
        headers={**carried, "x-stream-offset": 90},
        body=b'{"a":1}',
        routing_key="ns.journal",  # a carried copy's routing key is the stream's name
        content_type="application/json",
        properties={"message_id": "t1", "correlation_id": "c"},
        offset=90,
    )
    assert copy.destination == "alarms"
    assert copy.headers == original.headers  # where it is written is not part of the task
    assert (copy.id, copy.keys, copy.due_ms, copy.published_ms) == (
        original.id, original.keys, original.due_ms, original.published_ms,
    )  # fmt: skip
    index = index_of(original, copy)
    assert index.get("t1", NOW) == copy  # same stamp, later offset: the copy
