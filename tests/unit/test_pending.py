"""The pending view's windows: each count under the window that bounds its due time."""

from __future__ import annotations

import pytest

from rmqdelay.core.pending import WINDOWS, level_bound_s, window_of, windows


@pytest.mark.parametrize(
    ("seconds", "name"),
    [(0.0, "second"), (1.0, "second"), (1.01, "minute"), (60, "minute"), (61, "hour"),
     (86400, "day"), (604800, "week"), (604801, "later"), (1e12, "later")],
)  # fmt: skip
def test_window_of_is_the_first_that_ends_at_or_after(seconds: float, name: str) -> None:
    assert WINDOWS[window_of(seconds)][0] == name


def test_a_level_bounds_due_times_by_twice_its_ttl() -> None:
    assert level_bound_s(0, 1024) == 2.048
    assert level_bound_s(4, 250) == 8.0
    # Level k's TTL plus every lower level's plus less than a unit held: < 2^(k+1) units.
    for k in range(30):
        assert sum(2**j for j in range(k + 1)) + 1 == 2 ** (k + 1)


def test_levels_and_work_queues_fall_into_their_windows() -> None:
    counted = windows(
        levels=[(0, 5), (3, 7), (5, 1), (11, 2), (16, 3), (19, 4), (20, 6)],
        work=[(10, 2), (1, 0)],
        resolution_ms=1024,
    )
    by_name = {w.name: w for w in counted}
    # bounds at 1,024 ms: level 0 2 s, 3 16 s (minute); 5 66 s (hour); 11 70 min (day);
    # 16 37 h (week); 19 12 days and 20 25 days (later)
    assert [by_name[n].in_levels for n in ("second", "minute", "hour", "day", "week", "later")] == [
        0, 12, 1, 2, 3, 10,
    ]  # fmt: skip
    assert by_name["minute"].ready == 11, "work queues: due within a unit"
    assert by_name["minute"].held_or_running == 2
    assert sum(w.total for w in counted) == 5 + 7 + 1 + 2 + 3 + 4 + 6 + 11 + 2
    assert by_name["later"].ends_s is None


def test_with_a_fine_resolution_work_queues_count_under_the_second() -> None:
    counted = windows(levels=[(0, 1)], work=[(3, 4)], resolution_ms=100)
    assert (counted[0].in_levels, counted[0].ready, counted[0].held_or_running) == (1, 3, 4)


def test_a_wider_hold_window_widens_every_bound_by_the_difference() -> None:
    assert level_bound_s(0, 1024, 1.024) == level_bound_s(0, 1024) == 2.048
    assert level_bound_s(0, 1024, 8.0) == pytest.approx(9.024)
    counted = windows(levels=[(0, 1)], work=[(3, 4)], resolution_ms=1024, hold_window_s=8.0)
    assert (counted[1].in_levels, counted[1].ready, counted[1].held_or_running) == (1, 3, 4)
