"""``rmqdelay recurring add|list|preview|remove``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.errors import ConfigError
from rmqdelay.core.recurrence import CATCH_UPS, check_rule
from rmqdelay.settings import Settings
from rmqdelay.tools.logs import escape_controls


def add_parser(commands: Any, duration: Callable[[str], timedelta]) -> None:
    """The ``recurring`` command and its actions."""
    recurring = commands.add_parser(
        "recurring", help="recurring series: add, list, preview, remove"
    )
    actions = recurring.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="add a series (or replace the one under --key)")
    add.add_argument("destination")
    add.add_argument("payload", help="JSON text; raw with --content-type")
    _rule_arguments(add, duration)
    add.add_argument("--key", required=True, help="the series key (cancel it to stop)")
    add.add_argument(
        "--catch-up",
        choices=CATCH_UPS,
        default="once",
        help="after downtime: run once for all missed (default), each, or skip them",
    )
    add.add_argument("--content-type", help="send the payload as raw bytes of this type")

    listing = actions.add_parser("list", help="the series, with their next fire times")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    preview = actions.add_parser(
        "preview", help="when a rule would fire (shows daylight-saving handling); no broker"
    )
    _rule_arguments(preview, duration)
    preview.add_argument("--count", type=int, default=5, help="how many fire times")
    preview.add_argument("--from", dest="start", help="ISO 8601 time to start from (now)")

    remove = actions.add_parser("remove", help="stop a series and drop it from the list")
    remove.add_argument("key")


def _rule_arguments(parser: argparse.ArgumentParser, duration: Callable[[str], timedelta]) -> None:
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--cron", help="five fields: minute hour day-of-month month day-of-week")
    rule.add_argument("--every", type=duration, help="an interval: 30s, 5m, 1h")
    parser.add_argument("--tz", help="IANA time zone the cron expression is read in (UTC)")


async def run(args: argparse.Namespace, settings: Settings, payload: Any) -> int:
    """Carry out ``args.action``; the exit code."""
    if args.action == "preview":
        return _preview(args)
    if args.action == "add":  # a bad rule is refused before anything connects
        check_rule(cron=args.cron, every=args.every, tz=args.tz, now_ms=time.time_ns() // 10**6)
    async with Scheduler(settings) as scheduler:
        if args.action == "add":
            series = await scheduler.recurring(
                args.destination,
                payload,
                key=args.key,
                cron=args.cron,
                every=args.every,
                tz=args.tz,
                catch_up=args.catch_up,
                content_type=args.content_type,
            )
            upcoming = _times(series.upcoming)
            print(
                escape_controls(
                    f"{series.key}: {series.rule} -> {series.destination}; next {upcoming}"
                )
            )
        elif args.action == "remove":
            if args.key not in {series.key for series in await scheduler.series()}:
                raise ConfigError(
                    f"no series under key {args.key!r} ('rmqdelay recurring list' shows them); "
                    "nothing was changed"
                )
            await scheduler.remove_series(args.key)
            print(f"removed series {args.key!r} (its pending occurrence is cancelled)")
        else:
            for series in await scheduler.series():
                if args.json:
                    print(json.dumps(series.as_json(), ensure_ascii=False))
                else:
                    print(
                        escape_controls(
                            f"{series.key}  {series.destination}  {series.rule}  "
                            f"catch-up {series.catch_up}  next {_times(series.upcoming)}"
                        )
                    )
    return 0


def _preview(args: argparse.Namespace) -> int:
    now_ms = time.time_ns() // 1_000_000
    if args.start:
        try:
            start = datetime.fromisoformat(args.start)
        except ValueError:
            raise ConfigError(f"--from {args.start!r} is not an ISO 8601 time") from None
        if start.tzinfo is None:
            raise ConfigError(f"--from {args.start!r} needs a UTC offset, e.g. +01:00")
        now_ms = int(start.timestamp() * 1000)
    if not 1 <= args.count <= 1000:
        raise ConfigError(f"--count must be 1 to 1000, got {args.count}")
    rule = check_rule(cron=args.cron, every=args.every, tz=args.tz, now_ms=now_ms)
    print(f"{rule.describe()}:")
    previous: datetime | None = None
    for fire in rule.upcoming(now_ms, args.count):
        note = ""
        if previous is not None and previous.utcoffset() != fire.utcoffset():
            note = f"   (UTC offset {_offset(previous)} -> {_offset(fire)})"
        print(f"  {fire.isoformat()}  {fire.strftime('%a')}{note}")
        previous = fire
    return 0


def _offset(moment: datetime) -> str:
    return moment.strftime("%z")


def _times(times: tuple[datetime, ...]) -> str:
    return ", ".join(t.isoformat(timespec="seconds") for t in times)
