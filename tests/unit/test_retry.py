from datetime import timedelta
from typing import Any

import pytest

from rmqdelay.core.delays import DelayLimits
from rmqdelay.core.retry import BACKOFF_BASE_MS, MAX_ATTEMPTS, Decision, RetryPolicy, decide

POLICY = RetryPolicy(max_attempts=5, base_ms=1000, cap_ms=10_000)


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        (1, 500, 1000),
        (2, 1000, 2000),
        (3, 2000, 4000),
        (4, 4000, 8000),
        (5, 5000, 10_000),
        (80, 5000, 10_000),
    ],
)
def test_backoff_doubles_with_equal_jitter_up_to_the_cap(attempt: int, low: int, high: int) -> None:
    assert POLICY.backoff_ms(attempt, 0.0) == low
    assert low <= POLICY.backoff_ms(attempt, 0.5) <= high
    assert POLICY.backoff_ms(attempt, 0.999999) <= high


def test_task_headers_override_the_policy_and_bad_values_are_ignored() -> None:
    assert POLICY.for_task({}) is POLICY
    assert POLICY.for_task({MAX_ATTEMPTS: 2}).max_attempts == 2
    assert POLICY.for_task({BACKOFF_BASE_MS: 50}).base_ms == 50
    assert POLICY.for_task({MAX_ATTEMPTS: 0, BACKOFF_BASE_MS: "x"}) == POLICY
    assert POLICY.for_task({MAX_ATTEMPTS: True}) == POLICY
    assert RetryPolicy(1, 2, 3).headers() == {
        "rmqdelay-max-attempts": 1,
        "rmqdelay-backoff-base": 2,
        "rmqdelay-backoff-cap": 3,
    }


LIMITS = DelayLimits(256, 31, 3653 * 86_400_000_000)


def _decide(attempt: int, requested: Any = None, rand: float = 0.0) -> Decision:
    return decide(POLICY, attempt, "ValueError", "boom", requested, LIMITS, rand)


@pytest.mark.parametrize("attempt", [1, 2, 4])
def test_attempts_before_the_last_are_retried_after_the_backoff(attempt: int) -> None:
    d = _decide(attempt, rand=0.5)
    assert not d.park
    assert d.wait_us == POLICY.backoff_ms(attempt, 0.5) * 1000
    assert (d.error, d.detail) == ("ValueError", "boom")


@pytest.mark.parametrize("attempt", [5, 6, 100])
def test_the_last_attempt_and_beyond_park_with_the_reason(attempt: int) -> None:
    d = _decide(attempt)
    assert d.park
    assert d.reason(attempt, 5) == f"ValueError: boom (attempt {attempt} of 5)"


def test_a_requested_delay_replaces_the_backoff() -> None:
    assert _decide(1, timedelta(seconds=30)).wait_us == 30_000_000
    assert _decide(1, 0.25).wait_us == 250_000
    assert _decide(1, 0).wait_us == 0


@pytest.mark.parametrize(
    ("requested", "fragment"),
    [
        (1e12, "exceeds the maximum of 3653d"),
        (-1, "must not be negative"),
        (float("nan"), "must be finite"),
        ("soon", "not str"),
    ],
)
def test_a_refused_requested_delay_falls_back_to_the_backoff_and_says_why(
    requested: Any, fragment: str
) -> None:
    d = _decide(1, requested)
    assert not d.park
    assert d.wait_us == POLICY.backoff_ms(1, 0.0) * 1000
    assert d.error == "InvalidDelayError"
    assert d.detail.startswith("Retry(delay=...) refused: ")
    assert fragment in d.detail


def test_a_refused_requested_delay_on_the_last_attempt_parks_with_the_refusal() -> None:
    d = _decide(5, 1e12)
    assert d.park
    assert d.error == "InvalidDelayError"
