"""Delay arithmetic: durations, resolution units and hop plans. Pure; no I/O.

Level ``k`` holds a message exactly ``resolution * 2**k``. A delay becomes
``n = floor(delay / resolution)`` units, and the message visits the levels of the set bits
of ``n``, highest first: it spends exactly ``n`` units in the levels and reaches its work
queue at most one unit *before* it is due (plus broker hop time). The worker holds it
until its due time, so the levels can be coarse (few hops) and release is still exact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from rmqdelay.core.errors import InvalidDelayError

#: RabbitMQ 3.10 refuses an ``x-message-ttl`` above this (10 x 365 days, classic and quorum).
BROKER_MAX_TTL_MS = 315_360_000_000

_US_PER_MS = 1_000
_UNIT_US = {
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 604_800_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d|w)")


def parse_duration(text: str) -> timedelta:
    """Parse ``250ms``, ``90s``, ``30m``, ``2h``, ``3d``, ``1w`` or a sum like ``1h30m``.

    A bare number is refused rather than guessed at: ``30`` could mean seconds or minutes.
    So is a sum whose units do not go from largest to smallest, each at most once:
    ``10ms5s`` is far likelier a typo than 5.01 seconds.
    """
    compact = text.strip().replace(" ", "")
    shown = text if len(text) <= 60 else text[:57] + "..."
    if not compact:
        raise InvalidDelayError("empty duration; write it with a unit, e.g. 250ms, 90s, 30m, 2h")
    pos, total_us, last_unit_us = 0, Decimal(0), None
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        unit_us = _UNIT_US[match.group(2)]
        if last_unit_us is not None and unit_us >= last_unit_us:
            raise InvalidDelayError(
                f"cannot read duration {shown!r}: units must go from largest to smallest, each "
                f"once (e.g. 1h30m, 5s10ms); {match.group(2)!r} comes after a smaller or equal one"
            )
        total_us += Decimal(match.group(1)) * unit_us
        pos, last_unit_us = match.end(), unit_us
    if pos != len(compact):
        raise InvalidDelayError(
            f"cannot read duration {shown!r}; use a number with a unit (us, ms, s, m, h, d, w), "
            "e.g. 250ms, 90s, 30m, 2h, 1h30m"
        )
    try:
        return timedelta(microseconds=math.ceil(total_us))
    except OverflowError:
        raise InvalidDelayError(
            f"duration {shown!r} is beyond any delay rmqdelay can hold (~2.7 million years)"
        ) from None


def delay_to_us(delay: timedelta | float | int) -> int:
    """Return a delay as whole microseconds (rounded up), refusing what cannot be a delay.

    Floats and ints are seconds. Floats go through their shortest decimal form, so ``0.1``
    is exactly 100000 us rather than the binary float's 100000.00000000001.
    """
    if type(delay) is int:  # whole seconds: exact without Decimal (bool is not int here)
        us = delay * 1_000_000
    elif isinstance(delay, timedelta):
        us = delay // timedelta(microseconds=1)
    elif isinstance(delay, bool) or not isinstance(delay, int | float):
        raise InvalidDelayError(
            f"delay must be a timedelta or a number of seconds, not {type(delay).__name__} "
            f"({delay!r})"
        )
    else:
        try:
            seconds = Decimal(repr(delay)) if isinstance(delay, float) else Decimal(delay)
        except InvalidOperation as e:  # pragma: no cover - repr of a float is always parseable
            raise InvalidDelayError(f"delay {delay!r} is not a number") from e
        if not seconds.is_finite():
            raise InvalidDelayError(f"delay must be finite, got {delay!r}")
        us = math.ceil(seconds * 1_000_000)
    if us < 0:
        shown = f"-{describe_us(-us)}" if isinstance(delay, timedelta) else repr(delay)
        raise InvalidDelayError(f"delay must not be negative, got {shown}")
    return us


def level_count(resolution_ms: int, max_delay_us: int) -> int:
    """Number of levels needed so that every delay up to ``max_delay_us`` is exact."""
    return max(1, units_for(max_delay_us, resolution_ms).bit_length())


def units_for(delay_us: int, resolution_ms: int) -> int:
    """Resolution units that cover a delay, rounded up (how many levels a maximum needs)."""
    unit_us = resolution_ms * _US_PER_MS
    return -(-delay_us // unit_us)


def units_within(delay_us: int, resolution_ms: int, window_us: int | None = None) -> int:
    """The units a task spends in the levels: never more than its delay, and at most
    ``window_us`` (default: one unit) less, so that it reaches its work queue no later
    than due and at most that early (the worker holds it the rest). Of the counts that
    qualify, the one with the fewest hops: a wider window saves hops."""
    unit_us = resolution_ms * _US_PER_MS
    most = delay_us // unit_us
    if window_us is None or window_us <= unit_us:
        return most
    return fewest_hops(max(0, -(-(delay_us - window_us) // unit_us)), most)


def fewest_hops(low: int, high: int) -> int:
    """The count in ``low..high`` whose hop plan is shortest (fewest set bits).

    All counts in the range share the bits above the highest bit where ``low`` and
    ``high`` differ; ``high`` has a 1 there. The count that keeps those bits and that 1
    and clears the rest has one set bit more than the shared part, and every other count
    in the range has at least as many, unless ``low`` is the shared part alone (then it
    has fewer)."""
    if low >= high:
        return high
    top = (low ^ high).bit_length() - 1
    if low & ((2 << top) - 1) == 0:
        return low
    return high >> top << top


def level_ttl_ms(level: int, resolution_ms: int) -> int:
    """The fixed TTL of level ``level``."""
    return resolution_ms << level


def hop_plan(units: int) -> tuple[int, ...]:
    """Levels a message of ``units`` visits: the set bits of ``units``, highest first."""
    if units < 0:
        raise InvalidDelayError(f"units must not be negative, got {units}")
    return tuple(bit for bit in range(units.bit_length() - 1, -1, -1) if units >> bit & 1)


@dataclass(frozen=True, slots=True)
class DelayLimits:
    """What a given resolution and level count can express."""

    resolution_ms: int
    levels: int
    max_delay_us: int
    #: How early the levels may deliver a task (None: one unit); workers hold it until due.
    window_us: int | None = None

    def units(self, delay_us: int) -> int:
        """Units for ``delay_us``, refusing a delay over the configured maximum."""
        if delay_us > self.max_delay_us:
            raise InvalidDelayError(
                f"delay of {describe_us(delay_us)} exceeds the maximum of "
                f"{describe_us(self.max_delay_us)} (setting RMQDELAY_MAX_DELAY)"
            )
        return units_for(delay_us, self.resolution_ms)

    def whole_units(self, delay_us: int) -> int:
        """The whole units a task spends in the levels for ``delay_us`` (so it arrives at
        most the hold window early: the worker holds the rest; its hop plan is
        ``hop_plan`` of them), refusing a delay over the maximum."""
        self.units(delay_us)
        return units_within(delay_us, self.resolution_ms, self.window_us)


#: Units for describing a duration, largest first (weeks are left out: ``3653d`` reads
#: better than ``521w6d``).
_DESCRIBE_UNITS = (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000))


def describe_us(us: int) -> str:
    """A short human form of a duration, for messages, in the syntax ``parse_duration``
    reads: ``3653d``, ``1h30m``, ``250ms``, ``26335d5h31m46.776s``.

    Whole days, hours, minutes, then seconds with up to millisecond precision (rounded up,
    so a limit is never understated); microseconds only below a millisecond.
    """
    if us < 0:
        return "-" + describe_us(-us)
    if us == 0:
        return "0s"
    if us < 1_000:
        return f"{us}us"
    if us < 1_000_000:
        return f"{us // 1_000}ms" if us % 1_000 == 0 else f"{us / 1_000:.3f}".rstrip("0") + "ms"
    ms = -(-us // 1_000)
    parts, rest = [], ms * 1_000
    for unit, size in _DESCRIBE_UNITS[:-1]:
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if rest:
        seconds, millis = divmod(rest // 1_000, 1_000)
        parts.append(f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s")
    return "".join(parts)
