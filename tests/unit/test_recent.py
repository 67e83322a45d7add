"""The worker's memory of what it ran lately (a redelivery after a lost ack is not run again)."""

from rmqdelay.worker.recent import RecentRuns


def test_a_run_is_remembered_by_id_stamp_and_attempt() -> None:
    recent = RecentRuns()
    recent.add(RecentRuns.key("a", 1000, 1), now=0.0)
    assert RecentRuns.key("a", 1000, 1) in recent
    assert RecentRuns.key("a", 1000, 2) not in recent  # a retry is another run
    assert RecentRuns.key("a", 2000, 1) not in recent  # a rescheduled copy too
    assert RecentRuns.key("b", 1000, 1) not in recent


def test_runs_older_than_the_window_are_forgotten() -> None:
    recent = RecentRuns(keep_s=10, most=100)
    recent.add(1, now=0.0)
    recent.add(2, now=5.0)
    recent.add(3, now=10.5)
    assert [k in recent for k in (1, 2, 3)] == [False, True, True]
    recent.add(2, now=16.0)  # seen again: kept from its newest run
    recent.add(4, now=20.9)
    assert [k in recent for k in (2, 3, 4)] == [True, False, True]
    assert len(recent) == 2


def test_no_more_than_most_runs_are_kept() -> None:
    recent = RecentRuns(keep_s=1e9, most=3)
    for key in range(10):
        recent.add(key, now=float(key))
    assert len(recent) == 3
    assert [k in recent for k in (6, 7, 8, 9)] == [False, True, True, True]
