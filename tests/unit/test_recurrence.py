"""Recurring rules: cron in a zone across DST, intervals, catch-up, the series header."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from rmqdelay.core.errors import InvalidRecurrenceError
from rmqdelay.core.recurrence import (
    Rule,
    SeriesHeader,
    check_catch_up,
    check_rule,
    compact,
    decode_series,
    series_record,
    step,
)

BERLIN = ZoneInfo("Europe/Berlin")


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def _cron(expr: str, tz: str = "Europe/Berlin") -> Rule:
    return check_rule(cron=expr, every=None, tz=tz, now_ms=0)


def test_a_daily_cron_keeps_its_wall_clock_time_across_both_changes() -> None:
    rule = _cron("0 8 * * *")
    spring = rule.upcoming(_ms(datetime(2026, 3, 28, 9, tzinfo=BERLIN)), 2)
    autumn = rule.upcoming(_ms(datetime(2026, 10, 24, 9, tzinfo=BERLIN)), 2)
    assert [t.hour for t in spring + autumn] == [8, 8, 8, 8]
    # 23 and 25 hours of elapsed time apart: the same local time, not the same interval
    hours = [
        (t.timestamp() - before.timestamp()) / 3600
        for t, before in (
            (spring[0], datetime(2026, 3, 28, 8, tzinfo=BERLIN)),
            (autumn[0], datetime(2026, 10, 24, 8, tzinfo=BERLIN)),
            (spring[1], spring[0]),
        )
    ]
    assert hours == [23, 25, 24]


def test_a_time_that_does_not_exist_fires_when_time_resumes_once() -> None:
    # 2026-03-29: Berlin clocks jump from 02:00 to 03:00; 02:30 does not exist that day.
    rule = _cron("30 2 * * *")
    fires = rule.upcoming(_ms(datetime(2026, 3, 27, 12, tzinfo=BERLIN)), 3)
    assert [t.isoformat() for t in fires] == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]


def test_a_time_that_occurs_twice_fires_once_the_first_time() -> None:
    # 2026-10-25: Berlin clocks go back from 03:00 to 02:00; 02:30 happens twice.
    rule = _cron("30 2 * * *")
    fires = rule.upcoming(_ms(datetime(2026, 10, 24, 12, tzinfo=BERLIN)), 3)
    assert [t.isoformat() for t in fires] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]


def test_a_rule_without_an_hour_follows_the_clock_through_the_repeated_hour() -> None:
    rule = _cron("*/30 * * * *")
    fires = rule.upcoming(_ms(datetime(2026, 10, 25, 1, 40, tzinfo=BERLIN)), 5)
    assert [t.isoformat() for t in fires] == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    gaps = {b.timestamp() - a.timestamp() for a, b in itertools.pairwise(fires)}
    assert gaps == {1800}, "elapsed time never jumps or repeats"


def test_next_after_is_strictly_after_even_at_a_fire_time() -> None:
    rule = _cron("0 8 * * *", "UTC")
    at = _ms(datetime(2026, 1, 1, 8, tzinfo=UTC))
    assert rule.next_after(at) == _ms(datetime(2026, 1, 2, 8, tzinfo=UTC))
    assert rule.next_after(at - 1) == at


def test_an_interval_is_anchored_and_does_not_drift() -> None:
    rule = check_rule(cron=None, every=timedelta(seconds=30), tz=None, now_ms=1_000)
    assert rule.anchor_ms == 31_000
    assert rule.next_after(0) == 31_000
    assert rule.next_after(31_000) == 61_000
    assert rule.next_after(95_500) == 121_000
    assert rule.describe() == "every 30s"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"cron": None, "every": None}, "exactly one of cron= and every="),
        ({"cron": "0 8 * * *", "every": 30}, "exactly one"),
        ({"cron": "61 * * * *", "every": None}, "'61 * * * *'"),
        ({"cron": "0 8 * *", "every": None}, "'0 8 * *' has 4 fields; five fields"),
        # cronsim reads a sixth field as seconds: refused, not a series every second
        ({"cron": "* * * * * *", "every": None}, "has 6 fields; five fields"),
        ({"cron": "@daily", "every": None}, "has 1 field; five"),
        ({"cron": "", "every": None}, "cron must be"),
        ({"cron": None, "every": 0.5}, "under the shortest interval"),
        ({"cron": None, "every": timedelta(milliseconds=500)}, "every=500ms is under"),
        (
            {"cron": "0 8 * * *", "every": None, "tz": ""},
            "IANA zone name like 'Europe/Berlin', got ''",
        ),
        ({"cron": None, "every": float("nan")}, "under the shortest"),
        ({"cron": None, "every": -3}, "under the shortest"),
        ({"cron": None, "every": "30s"}, "timedelta or seconds"),
        ({"cron": None, "every": 10**12}, "over ten years"),
        ({"cron": "0 8 * * *", "every": None, "tz": "Europe/Berln"}, "'Europe/Berln'"),
        ({"cron": "0 8 * * *", "every": None, "tz": "../../etc/passwd"}, "unknown time zone"),
        ({"cron": None, "every": 60, "tz": "Europe/Berlin"}, "no meaning for every"),
    ],
)
def test_bad_rules_are_refused_naming_the_value(kwargs: dict[str, object], says: str) -> None:
    kwargs.setdefault("tz", None)
    with pytest.raises(InvalidRecurrenceError) as caught:
        check_rule(now_ms=0, **kwargs)  # type: ignore[arg-type]
    assert says in str(caught.value)


def test_catch_up_must_be_a_policy() -> None:
    assert check_catch_up("all") == "all"
    with pytest.raises(InvalidRecurrenceError, match="'sometimes'"):
        check_catch_up("sometimes")


EVERY_10S = Rule(None, 10_000, "UTC", 0)


@pytest.mark.parametrize("policy", ["once", "all", "skip"])
def test_an_occurrence_on_time_runs_and_the_next_follows_it(policy: str) -> None:
    plan = step(EVERY_10S, policy, 50_000, 50_300)  # type: ignore[arg-type]
    assert (plan.run, plan.next_due_ms) == (True, 60_000)


def test_after_downtime_once_runs_one_and_goes_on_from_now() -> None:
    plan = step(EVERY_10S, "once", 50_000, 95_000)
    assert (plan.run, plan.next_due_ms) == (True, 100_000)


def test_after_downtime_all_runs_each_missed_one_in_turn() -> None:
    plan = step(EVERY_10S, "all", 50_000, 95_000)
    assert (plan.run, plan.next_due_ms) == (True, 60_000)


def test_after_downtime_skip_runs_none_and_waits_for_the_next() -> None:
    plan = step(EVERY_10S, "skip", 50_000, 95_000)
    assert (plan.run, plan.next_due_ms) == (False, 100_000)


def test_the_series_header_round_trips() -> None:
    for rule in (EVERY_10S, _cron("0 8 * * 1-5")):
        header = SeriesHeader("report:daily", rule, "skip", 1234)
        assert decode_series(header.encode()) == header
        assert decode_series(header.encode().encode()) == header


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        '{"key": "k"}',
        '{"key": "k", "since": 1, "cron": "nope"}',
        '{"key": "k", "since": 1, "every_ms": 5, "anchor": 0}',
        '{"key": 5, "since": 1, "every_ms": 5000, "anchor": 0}',
        '{"key": "k", "since": 1, "every_ms": 5000, "anchor": 0, "tz": "Mars/Base"}',
        '{"key": "k", "since": 1, "every_ms": 5000, "anchor": 0, "catch_up": "x"}',
        12,
    ],
)
def test_a_bad_series_header_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRecurrenceError):
        decode_series(bad)


def test_the_registry_compacts_by_key_and_drops_removed() -> None:
    a1 = SeriesHeader("a", EVERY_10S, "once", 1)
    a2 = SeriesHeader("a", _cron("0 8 * * *"), "once", 2)
    b = SeriesHeader("b", EVERY_10S, "all", 3)
    records = [
        series_record(a1, "d1"),
        series_record(b, "d2"),
        b"garbage",
        series_record(a2, "d3"),
        series_record(b, "", removed=True),
    ]
    assert compact(records) == {"a": (a2, "d3")}
