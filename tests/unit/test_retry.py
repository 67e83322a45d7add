import pytest

from rmqdelay.retry import BACKOFF_BASE_MS, MAX_ATTEMPTS, RetryPolicy

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
