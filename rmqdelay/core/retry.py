"""Retry policy: how many attempts, how long between them. Pure; no I/O.

Backoff is exponential with "equal jitter": attempt n waits a random time between half and
all of ``min(cap, base * 2**(n-1))``, so retries of many failed tasks spread out but never
come sooner than half the nominal backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from rmqdelay.core.delays import DelayLimits, delay_to_us
from rmqdelay.core.errors import InvalidDelayError

MAX_ATTEMPTS = "rmqdelay-max-attempts"
BACKOFF_BASE_MS = "rmqdelay-backoff-base"
BACKOFF_CAP_MS = "rmqdelay-backoff-cap"


class Retry(Exception):
    """Raise from a handler to run the task again after ``delay`` (counts as an attempt).

    ``raise Retry(delay=timedelta(seconds=30))``; with no delay the policy's backoff applies.
    """

    def __init__(self, delay: timedelta | float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested by the handler")
        self.delay = delay


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts and backoff; a worker's default, overridable per task by headers."""

    max_attempts: int
    base_ms: int
    cap_ms: int

    def backoff_ms(self, failed_attempt: int, rand: float) -> int:
        """Wait after attempt ``failed_attempt`` (1-based) failed; ``rand`` is in [0, 1)."""
        exponent = min(failed_attempt - 1, 62)  # beyond this the cap has long applied
        ceiling = min(self.cap_ms, self.base_ms << exponent)
        half = ceiling // 2
        return half + int(rand * (ceiling - half))

    def for_task(self, headers: Mapping[str, Any]) -> RetryPolicy:
        """This policy with the task's own overrides (positive integer headers) applied."""
        overrides = {
            field: value
            for field, header in (
                ("max_attempts", MAX_ATTEMPTS),
                ("base_ms", BACKOFF_BASE_MS),
                ("cap_ms", BACKOFF_CAP_MS),
            )
            if isinstance(value := headers.get(header), int)
            and not isinstance(value, bool)
            and value > 0
        }
        return replace(self, **overrides) if overrides else self

    def headers(self) -> dict[str, int]:
        """This policy as per-task override headers."""
        return {
            MAX_ATTEMPTS: self.max_attempts,
            BACKOFF_BASE_MS: self.base_ms,
            BACKOFF_CAP_MS: self.cap_ms,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a task whose attempt failed: park it, or run it again after
    ``wait_us``. ``error`` and ``detail`` say why (a refused ``Retry(delay=)`` replaces the
    handler's own reason)."""

    park: bool
    wait_us: int
    error: str
    detail: str

    def reason(self, attempt: int, max_attempts: int) -> str:
        """The parking-lot reason."""
        return f"{self.error}: {self.detail} (attempt {attempt} of {max_attempts})"


def decide(
    policy: RetryPolicy,
    attempt: int,
    error: str,
    detail: str,
    requested: timedelta | float | None,
    limits: DelayLimits,
    rand: float,
) -> Decision:
    """Retry or park after failed attempt ``attempt`` (1-based); ``requested`` is a handler's
    ``Retry(delay=)``, refused (and replaced by the backoff) when it is not a delay the
    levels can hold; ``rand`` in [0, 1) jitters the backoff."""
    wait_us: int | None = None
    if requested is not None:
        try:
            wait_us = delay_to_us(requested)
            limits.units(wait_us)  # over the maximum: refused, not capped
        except InvalidDelayError as e:
            error, detail, wait_us = "InvalidDelayError", f"Retry(delay=...) refused: {e}", None
    if attempt >= policy.max_attempts:
        return Decision(True, 0, error, detail)
    if wait_us is None:
        wait_us = policy.backoff_ms(attempt, rand) * 1000
    return Decision(False, wait_us, error, detail)
