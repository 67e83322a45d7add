from datetime import timedelta

import pytest

from rmqdelay.core.delays import (
    DelayLimits,
    delay_to_us,
    describe_us,
    fewest_hops,
    hop_plan,
    level_count,
    level_ttl_ms,
    parse_duration,
    units_for,
    units_within,
)
from rmqdelay.core.errors import InvalidDelayError

EDGE_UNITS = sorted(
    {n for k in range(41) for n in (2**k - 1, 2**k, 2**k + 1) if n >= 0} | set(range(1025))
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(weeks=1)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("0s", timedelta(0)),
        (" 2h 5m ", timedelta(minutes=125)),
        ("7us", timedelta(microseconds=7)),
    ],
)
def test_parse_duration_reads_units(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "ms", "5x", "-5s", "1h-", "1.s", "abc"])
def test_parse_duration_refuses_and_names_the_text(text: str) -> None:
    with pytest.raises(InvalidDelayError) as info:
        parse_duration(text)
    if text.strip():
        assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("delay", "us"),
    [
        (0, 0),
        (0.1, 100_000),  # exactly, not 100_001 via binary float error
        (0.3, 300_000),
        (1, 1_000_000),
        (1e-7, 1),  # rounded up, never down
        (timedelta(milliseconds=5), 5_000),
        (timedelta(microseconds=1), 1),
    ],
)
def test_delay_to_us_is_exact_and_rounds_up(delay: float | timedelta, us: int) -> None:
    assert delay_to_us(delay) == us


@pytest.mark.parametrize(
    ("delay", "fragment"),
    [
        (-1, "negative"),
        (-0.001, "negative"),
        (timedelta(seconds=-1), "negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (float("-inf"), "finite"),
        (True, "bool"),
        ("5s", "str"),
        (None, "NoneType"),
    ],
)
def test_delay_to_us_refuses_bad_delays(delay: object, fragment: str) -> None:
    with pytest.raises(InvalidDelayError, match=fragment):
        delay_to_us(delay)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("delay_us", "resolution_ms", "units"),
    [
        (0, 10, 0),
        (1, 10, 1),
        (9_999, 10, 1),
        (10_000, 10, 1),
        (10_001, 10, 2),
        (50_000, 10, 5),
        (1, 1, 1),
        (1_000, 1, 1),
        (1_001, 1, 2),
    ],
)
def test_units_round_up_to_the_resolution(delay_us: int, resolution_ms: int, units: int) -> None:
    assert units_for(delay_us, resolution_ms) == units
    assert units * resolution_ms * 1000 >= delay_us  # never early


@pytest.mark.parametrize("n", EDGE_UNITS)
def test_hop_plan_visits_the_set_bits_highest_first(n: int) -> None:
    plan = hop_plan(n)
    assert sum(1 << level for level in plan) == n
    assert list(plan) == sorted(set(plan), reverse=True)
    assert len(plan) == bin(n).count("1")


def test_hop_plan_of_zero_is_empty_and_negative_is_refused() -> None:
    assert hop_plan(0) == ()
    with pytest.raises(InvalidDelayError):
        hop_plan(-1)


@pytest.mark.parametrize(
    ("resolution_ms", "max_delay", "levels"),
    [
        (10, timedelta(days=3653), 35),
        (1, timedelta(days=3653), 39),
        (10, timedelta(milliseconds=10), 1),
        (10, timedelta(milliseconds=11), 2),  # 2 units need levels 0 and 1
        (10, timedelta(milliseconds=30), 2),
        (10, timedelta(milliseconds=40), 3),
        (1000, timedelta(seconds=1), 1),
    ],
)
def test_level_count_covers_the_maximum(
    resolution_ms: int, max_delay: timedelta, levels: int
) -> None:
    max_us = delay_to_us(max_delay)
    assert level_count(resolution_ms, max_us) == levels
    # every delay up to the maximum has a plan within the levels
    assert max(hop_plan(units_for(max_us, resolution_ms)), default=0) < levels


def test_level_ttls_double() -> None:
    assert [level_ttl_ms(k, 10) for k in range(4)] == [10, 20, 40, 80]


@pytest.mark.parametrize("resolution_ms", [1, 10, 256])
@pytest.mark.parametrize(
    "delay_us",
    [
        0,
        1,
        999,
        1_000,
        9_999,
        10_000,
        10_001,
        255_999,
        256_000,
        5_000_000,
        86_400_000_000,
        3653 * 86_400_000_000,
    ],
)
def test_plans_arrive_at_most_one_unit_early_and_never_late(
    delay_us: int, resolution_ms: int
) -> None:
    limits = DelayLimits(
        resolution_ms, level_count(resolution_ms, 3653 * 86_400_000_000), 3653 * 86_400_000_000
    )
    plan = hop_plan(limits.whole_units(delay_us))
    in_levels_us = sum(level_ttl_ms(level, resolution_ms) for level in plan) * 1000
    assert in_levels_us <= delay_us, "never late by the levels' own doing"
    assert delay_us - in_levels_us < resolution_ms * 1000, "at most one unit early: held"
    assert all(level < limits.levels for level in plan)


def test_fewest_hops_is_the_largest_count_with_the_fewest_set_bits() -> None:
    for low in range(260):
        for high in range(low, 260):
            fewest = min(n.bit_count() for n in range(low, high + 1))
            best = max(n for n in range(low, high + 1) if n.bit_count() == fewest)
            assert fewest_hops(low, high) == best, (low, high)
    # far beyond what a loop checks: 2^40 - 3 .. 2^40 + 5 holds 2^40
    assert fewest_hops(2**40 - 3, 2**40 + 5) == 2**40


@pytest.mark.parametrize("resolution_ms", [1, 256, 1024])
@pytest.mark.parametrize("window_ms", [None, 1024, 2000, 4096, 10_000])
def test_a_window_lets_the_levels_deliver_that_early_with_the_fewest_hops(
    resolution_ms: int, window_ms: int | None
) -> None:
    unit_us = resolution_ms * 1000
    window_us = None if window_ms is None else window_ms * 1000
    # A window of one unit or less is the default: less than one unit early.
    early_us = window_us if window_us is not None and window_us > unit_us else unit_us - 1
    for delay_us in [
        *range(0, 12 * unit_us, max(1, unit_us // 7)),
        *(n * unit_us for n in EDGE_UNITS),
    ]:
        units = units_within(delay_us, resolution_ms, window_us)
        in_levels_us = units * unit_us
        assert in_levels_us <= delay_us, "never late by the levels' own doing"
        assert delay_us - in_levels_us <= early_us, "never earlier than the window"
        qualifying = [
            n
            for n in range(max(0, (delay_us - early_us) // unit_us), delay_us // unit_us + 1)
            if delay_us - early_us <= n * unit_us <= delay_us
        ]
        assert units.bit_count() == min(n.bit_count() for n in qualifying), delay_us


def test_a_wider_window_saves_hops_for_short_delays() -> None:
    # 0.05-5 s at 1,024 ms: up to two hops in one unit's window, none in a 5 s one.
    delays_us = range(50_000, 5_000_001, 10_000)
    one_unit = sum(units_within(d, 1024).bit_count() for d in delays_us) / len(delays_us)
    wide = sum(units_within(d, 1024, 5_000_000).bit_count() for d in delays_us) / len(delays_us)
    assert one_unit > 1.0
    assert wide == 0.0


def test_limits_refuse_delays_over_the_maximum_and_name_both() -> None:
    limits = DelayLimits(resolution_ms=10, levels=3, max_delay_us=70_000)
    assert limits.units(70_000) == 7
    with pytest.raises(InvalidDelayError, match=r"70\.001ms exceeds the maximum of 70ms"):
        limits.units(70_001)


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0, "0s"),
        (5, "5us"),
        (2_000, "2ms"),
        (3_000_000, "3s"),
        (7_200_000_000, "2h"),
        (86_400_000_000 * 2, "2d"),
        (1_500, "1.5ms"),
        (5_400_000_000, "1h30m"),
        (3653 * 86_400_000_000, "3653d"),
        # Retry(delay=1e12)-sized: human units, never 2275442306775524us.
        (2_275_442_306_775_524, "26336d3h18m26.776s"),
    ],
)
def test_describe_us(us: int, text: str) -> None:
    assert describe_us(us) == text


@pytest.mark.parametrize("us", [1_000, 1_001_000, 59_999_000, 86_399_999_000, 10**15 + 7_000])
def test_describe_us_reads_back_exactly_at_millisecond_precision(us: int) -> None:
    assert parse_duration(describe_us(us)) == timedelta(microseconds=us)


def test_describe_us_never_understates() -> None:
    assert parse_duration(describe_us(1_000_001)) >= timedelta(microseconds=1_000_001)


@pytest.mark.parametrize("text", ["10ms5s", "1h1h", "5s1h", "30m2h"])
def test_parse_duration_refuses_units_out_of_order(text: str) -> None:
    with pytest.raises(InvalidDelayError, match="largest to smallest"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["9" * 30 + "w", "999999999999d", "1" * 5000 + "s"])
def test_parse_duration_refuses_what_no_timedelta_holds_naming_it_briefly(text: str) -> None:
    with pytest.raises(InvalidDelayError, match="beyond any delay") as caught:
        parse_duration(text)
    assert len(str(caught.value)) < 200
