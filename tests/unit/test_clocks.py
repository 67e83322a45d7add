"""A worker's report of publishers whose clocks run ahead of its own."""

from __future__ import annotations

import logging

import pytest

from rmqdelay.core.wire import PUBLISHED_MS, TASK_ID
from rmqdelay.worker.clocks import SKEW_REPORT_EVERY_MS, SkewReport


def _stamped(published_ms: object) -> dict[str, object]:
    return {TASK_ID: "t1", PUBLISHED_MS: published_ms}


def test_a_stamp_ahead_is_said_at_once_then_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    report, now = SkewReport(), 1_000_000.0
    with caplog.at_level(logging.WARNING, "rmqdelay.worker.clocks"):
        report.check(_stamped(int(now) + 5000), now)
        for i in range(100):
            report.check(_stamped(int(now) + 7000), now + i)
        assert len(caplog.records) == 1
        assert "up to 5.0 s ahead" in caplog.records[0].getMessage()
        report.check(_stamped(int(now + SKEW_REPORT_EVERY_MS) + 2000), now + SKEW_REPORT_EVERY_MS)
    assert len(caplog.records) == 2
    # What came between: 101 tasks, the largest lead among them.
    assert caplog.records[1].getMessage().startswith("101 task(s) (the last t1)")
    assert "up to 7.0 s ahead" in caplog.records[1].getMessage()


@pytest.mark.parametrize(
    "headers",
    [None, {}, _stamped(1_000_999), _stamped(999_000), _stamped("1000000"), _stamped(1.5e9)],
)
def test_stamps_behind_close_or_malformed_say_nothing(
    headers: dict[str, object] | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "rmqdelay.worker.clocks"):
        SkewReport().check(headers, 1_000_000.0)
    assert caplog.records == []
