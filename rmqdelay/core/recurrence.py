"""Recurring series: the rule, when it fires next, and what to do after downtime. Pure.

A series lives in its one pending occurrence: that task carries the rule (header
``rmqdelay-series``), and the worker that takes it schedules the next occurrence,
confirmed, before it runs the handler (``worker/series.py``). Nothing else keeps time.

Cron expressions are read by cronsim, which follows cronie (Vixie cron) across
daylight-saving changes, in the series' time zone (``zoneinfo``):

- a wall-clock time that does not exist that day (02:30 when clocks jump from 02:00 to
  03:00) fires when time resumes (03:00), once;
- a time that occurs twice (02:30 when clocks go back from 03:00 to 02:00) fires once, the
  first time, for rules that name the hour; rules that do not (``*/30 * * * *``) follow
  the clock through both passes of the repeated hour.

Intervals (``every``) are plain elapsed time from the series' anchor, immune to zones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from rmqdelay.core.delays import describe_us
from rmqdelay.core.errors import InvalidRecurrenceError
from rmqdelay.core.wire import ms_to_datetime

CatchUp = Literal["once", "all", "skip"]
CATCH_UPS: tuple[CatchUp, ...] = get_args(CatchUp)
#: The shortest interval: a series is a task a tick, not a timer loop.
MIN_EVERY_MS = 1000
#: Header of an occurrence: the series it belongs to, as JSON.
SERIES = "rmqdelay-series"
#: A series key also prefixes its occurrences' keys (``<key>@<due ms>``); room for that.
MAX_SERIES_KEY_BYTES = 200


@dataclass(frozen=True, slots=True)
class Rule:
    """When a series fires: a cron expression in a time zone, or an interval from an
    anchor (the first due time)."""

    cron: str | None
    every_ms: int | None
    tz: str
    anchor_ms: int

    def next_after(self, t_ms: int) -> int:
        """The first fire time strictly after ``t_ms`` (ms since the epoch)."""
        if self.every_ms is not None:
            if t_ms < self.anchor_ms:
                return self.anchor_ms
            return self.anchor_ms + ((t_ms - self.anchor_ms) // self.every_ms + 1) * self.every_ms
        assert self.cron is not None
        start = datetime.fromtimestamp(t_ms / 1000, ZoneInfo(self.tz))
        fire = next(CronSim(self.cron, start))
        return math.ceil(fire.timestamp() * 1000)

    def upcoming(self, after_ms: int, count: int) -> list[datetime]:
        """The next ``count`` fire times after ``after_ms``, in the series' zone."""
        zone, times, t = ZoneInfo(self.tz), [], after_ms
        for _ in range(count):
            t = self.next_after(t)
            times.append(datetime.fromtimestamp(t / 1000, zone))
        return times

    def describe(self) -> str:
        """``cron '0 8 * * *' (Europe/Berlin)`` or ``every 30s``."""
        if self.every_ms is not None:
            return f"every {describe_us(self.every_ms * 1000)}"
        return f"cron {self.cron!r} ({self.tz})"


def check_rule(
    *, cron: str | None, every: timedelta | float | None, tz: str | None, now_ms: int
) -> Rule:
    """A rule from what the caller gave; an interval series is anchored ``every`` after now.

    Raises:
        InvalidRecurrenceError: naming the bad value.
    """
    if (cron is None) == (every is None):
        raise InvalidRecurrenceError(
            f"give exactly one of cron= and every= (got cron={cron!r}, every={every!r})"
        )
    zone = check_zone("UTC" if tz is None else tz)  # an empty one is a mistake, not UTC
    if every is not None:
        if tz not in (None, "UTC"):
            raise InvalidRecurrenceError(
                f"tz={tz!r} has no meaning for every=: an interval is elapsed time"
            )
        every_ms = _every_ms(every)
        return Rule(None, every_ms, "UTC", now_ms + every_ms)
    assert cron is not None
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidRecurrenceError(f"cron must be an expression like '0 8 * * *', got {cron!r}")
    if (fields := len(cron.split())) != 5:
        # cronsim also reads a sixth field, of seconds: a series every second by mistake.
        raise InvalidRecurrenceError(
            f"cron {cron[:80]!r} has {fields} field{'s' if fields != 1 else ''}; five fields: "
            "minute hour day-of-month month day-of-week, e.g. '0 8 * * *' (for seconds, "
            "use every=)"
        )
    try:
        CronSim(cron, datetime.now(ZoneInfo(zone)))
    except CronSimError as e:
        raise InvalidRecurrenceError(
            f"cron {cron[:80]!r} is not a valid expression ({e}); five fields: minute hour "
            "day-of-month month day-of-week, e.g. '0 8 * * *'"
        ) from None
    return Rule(cron.strip(), None, zone, 0)


def check_zone(tz: object) -> str:
    """``tz`` if zoneinfo knows it.

    Raises:
        InvalidRecurrenceError: naming it.
    """
    if not isinstance(tz, str) or not tz or len(tz) > 64:
        raise InvalidRecurrenceError(
            f"tz must be an IANA zone name like 'Europe/Berlin', got {tz!r}"
        )
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidRecurrenceError(
            f"unknown time zone {tz!r}; give an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from None
    return tz


def check_catch_up(value: object) -> CatchUp:
    """Raises InvalidRecurrenceError unless ``value`` is a catch-up policy."""
    if value not in CATCH_UPS:
        raise InvalidRecurrenceError(
            f"catch_up must be one of {', '.join(CATCH_UPS)}, got {value!r}"
        )
    return value


def _every_ms(every: timedelta | float) -> int:
    if isinstance(every, bool) or not isinstance(every, timedelta | int | float):
        raise InvalidRecurrenceError(f"every must be a timedelta or seconds, got {every!r}")
    seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
    shown = f"{every!r}" if not math.isfinite(seconds) else describe_us(round(seconds * 1e6))
    if not math.isfinite(seconds) or seconds * 1000 < MIN_EVERY_MS:
        raise InvalidRecurrenceError(
            f"every={shown} is under the shortest interval of {MIN_EVERY_MS // 1000}s"
        )
    if seconds > 3653 * 86400:
        raise InvalidRecurrenceError(f"every={shown} is over ten years")
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Step:
    """What a worker does with an occurrence due ``due_ms`` taken at ``now_ms``."""

    #: Run the handler for it (False: a missed occurrence that ``skip`` passes over).
    run: bool
    #: When the next occurrence is due.
    next_due_ms: int


def step(rule: Rule, catch_up: CatchUp, due_ms: int, now_ms: int) -> Step:
    """After downtime an occurrence arrives late. It counts as missed when the one after
    it is due already. Then ``once`` runs it and goes on from now (one run for everything
    missed), ``all`` runs it and goes on from its own due time (each missed one runs, one
    after the other), ``skip`` does not run it and goes on from now."""
    following = rule.next_after(due_ms)
    if following > now_ms or catch_up == "all":
        return Step(True, following)
    return Step(catch_up == "once", rule.next_after(now_ms))


@dataclass(frozen=True, slots=True)
class SeriesHeader:
    """What each occurrence carries: its series and the series' rule."""

    key: str
    rule: Rule
    catch_up: CatchUp
    #: The publish stamp of the series' record (the series' identity across replacements).
    since_ms: int

    def encode(self) -> str:
        """The ``rmqdelay-series`` header value."""
        r = self.rule
        doc: dict[str, Any] = {"key": self.key, "tz": r.tz, "catch_up": self.catch_up}
        doc["since"] = self.since_ms
        if r.every_ms is not None:
            doc |= {"every_ms": r.every_ms, "anchor": r.anchor_ms}
        else:
            doc["cron"] = r.cron
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def decode_series(value: object) -> SeriesHeader:
    """Read an ``rmqdelay-series`` header (or a series record's body).

    Raises:
        InvalidRecurrenceError: saying what is wrong with it.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        doc = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise InvalidRecurrenceError(f"header {SERIES!r} is not a JSON object: {str(value)[:80]!r}")
    try:
        key, since = doc["key"], doc["since"]
        catch_up = check_catch_up(doc.get("catch_up", "once"))
        tz = check_zone(doc.get("tz", "UTC"))
        if "every_ms" in doc:
            every, anchor = doc["every_ms"], doc["anchor"]
            if not (isinstance(every, int) and every >= MIN_EVERY_MS and isinstance(anchor, int)):
                raise InvalidRecurrenceError(f"bad interval in {SERIES!r}: {doc!r}"[:200])
            rule = Rule(None, every, tz, anchor)
        else:
            rule = check_rule(cron=doc["cron"], every=None, tz=tz, now_ms=0)
    except KeyError as e:
        raise InvalidRecurrenceError(f"header {SERIES!r} lacks {e.args[0]!r}") from None
    if not isinstance(key, str) or not isinstance(since, int):
        raise InvalidRecurrenceError(f"header {SERIES!r} has a bad key or stamp")
    return SeriesHeader(key, rule, catch_up, since)


def occurrence_key(series_key: str, due_ms: int) -> str:
    """The cancel key of one occurrence: a worker that takes an occurrence a second time
    (it died before the ack) cancels the next occurrence it may have scheduled already
    before it schedules it again, so that one stays pending, never two."""
    return f"{series_key}@{due_ms}"


@dataclass(frozen=True, slots=True)
class Series:
    """A recurring series, as ``recurring()`` returns it and ``rmqdelay recurring list``
    shows it.

    Attributes:
        key: The series key (cancelling it stops the series).
        destination: Where its occurrences go.
        rule: ``cron '0 8 * * *' (Europe/Berlin)`` or ``every 30s``.
        tz: The time zone its cron expression is read in.
        catch_up: After downtime: ``once``, ``all`` or ``skip``.
        upcoming: The next fire times from now, in ``tz``.
        since: When it was added (or last replaced).
    """

    key: str
    destination: str
    rule: str
    tz: str
    catch_up: CatchUp
    upcoming: tuple[datetime, ...]
    since: datetime

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "key": self.key,
            "destination": self.destination,
            "rule": self.rule,
            "tz": self.tz,
            "catch_up": self.catch_up,
            "upcoming": [t.isoformat() for t in self.upcoming],
            "since": self.since.isoformat(),
        }


def describe_series(header: SeriesHeader, destination: str, now_ms: int, count: int) -> Series:
    """The public view of a series from its header."""
    rule = header.rule
    return Series(
        header.key,
        destination,
        rule.describe(),
        rule.tz,
        header.catch_up,
        tuple(rule.upcoming(now_ms, count)),
        ms_to_datetime(header.since_ms),
    )


def series_record(header: SeriesHeader, destination: str, *, removed: bool = False) -> bytes:
    """A record of the series registry stream: the series as its occurrences carry it."""
    doc = {"series": header.encode(), "destination": destination, "removed": removed}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def compact(records: list[bytes]) -> dict[str, tuple[SeriesHeader, str]]:
    """The registry from its records, oldest first: the last record of each key wins, a
    removal drops the key, and a record that does not decode is passed over (a registry
    is a view; the series live in their tasks)."""
    live: dict[str, tuple[SeriesHeader, str]] = {}
    for body in records:
        try:
            doc = json.loads(body)
            header = decode_series(doc["series"])
            destination = doc["destination"]
        except (ValueError, KeyError, TypeError, InvalidRecurrenceError):
            continue
        if doc.get("removed"):
            live.pop(header.key, None)
        elif isinstance(destination, str):
            live[header.key] = (header, destination)
    return live
