"""``rmqdelay tasks list|show``, ``reschedule``, ``export``, ``import`` and ``transfer``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta
from typing import Any, TextIO, cast
from urllib.parse import quote

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.cli.arguments import hops, int_between
from rmqdelay.core.errors import ConfigError
from rmqdelay.core.journal import MAX_PAGE
from rmqdelay.settings import Settings
from rmqdelay.tools.api_client import ApiClient
from rmqdelay.tools.logs import escape_controls
from rmqdelay.tools.moving import DEFAULT_MARGIN_S, export, import_items, read_export, transfer
from rmqdelay.tools.task_json import pending_json, shown

WHEN = "a delay from now (30m, 2h) or ISO 8601 with a UTC offset"
MS = timedelta(milliseconds=1)


def add_parsers(commands: Any, duration: Callable[[str], timedelta]) -> None:
    """The commands that look at and move pending tasks."""
    tasks = commands.add_parser(
        "tasks", help="pending tasks: list, show (through RMQDELAY_API_URL if set)"
    )
    actions = tasks.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="pending tasks, soonest due first")
    listing.add_argument("--key", help="only tasks under this key (or with this id)")
    listing.add_argument("--destination", help="only tasks for this destination")
    listing.add_argument("--due-before", help=f"only tasks due before this: {WHEN}")
    listing.add_argument("--due-after", help=f"only tasks due at or after this: {WHEN}")
    listing.add_argument(
        "--limit", type=int_between(1, MAX_PAGE), default=100, help="tasks per page (100)"
    )
    listing.add_argument("--cursor", help="the next page: the cursor the last page printed")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="one pending task, with payload and properties")
    show.add_argument("task_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="as one JSON object")

    reschedule = commands.add_parser(
        "reschedule", help="move a pending task (by id, or the one under a key) to a new time"
    )
    reschedule.add_argument("key", metavar="ID_OR_KEY")
    when = reschedule.add_mutually_exclusive_group(required=True)
    when.add_argument("--delay", type=duration, help="from now: 250ms, 90s, 30m, 2h, 3d")
    when.add_argument("--at", help="ISO 8601 with a UTC offset, e.g. 2026-12-01T08:00:00+08:00")

    out = commands.add_parser(
        "export", help="write pending tasks, live cancels and series as JSON lines"
    )
    out.add_argument("file", metavar="FILE", help="where to write ('-': standard output)")
    into = commands.add_parser(
        "import", help="schedule what an export holds here (again: nothing doubles)"
    )
    into.add_argument("file", metavar="FILE", help="an export ('-': standard input)")

    move = commands.add_parser(
        "transfer", help="move pending tasks, cancels and series to another broker"
    )
    move.add_argument("--to", required=True, metavar="URL[,URL...]", help="the target broker")
    move.add_argument("--to-namespace", help="the target namespace (default: the same)")
    move.add_argument(
        "--margin",
        type=duration,
        default=timedelta(seconds=DEFAULT_MARGIN_S),
        help=f"leave tasks due sooner than this to the source's workers ({DEFAULT_MARGIN_S:g}s)",
    )


def when(text: str | None, what: str, duration: Callable[[str], timedelta]) -> datetime | None:
    """A time given on the command line as a delay from now or an ISO 8601 time."""
    if text is None:
        return None
    if "T" in text or "-" in text[1:]:
        return iso_time(text, what)
    return datetime.now().astimezone() + duration(text)


def iso_time(text: str, what: str) -> datetime:
    """An ISO 8601 time with a UTC offset, or a ConfigError naming ``what``."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None:
        raise ConfigError(f"{what} {text!r} needs a UTC offset, e.g. +01:00 or Z")
    return moment


async def run_tasks(
    args: argparse.Namespace, settings: Settings, duration: Callable[[str], timedelta]
) -> int:
    """``tasks list`` and ``tasks show``: from a running ``serve`` if RMQDELAY_API_URL
    names one, else by reading the journal here."""
    api = _api(settings)
    if args.action == "show":
        _show(await _whole(args.task_id, settings, api), args.json)
        return 0
    due_before = when(args.due_before, "--due-before", duration)
    due_after = when(args.due_after, "--due-after", duration)
    if api is not None:
        page = api.get(
            "/v1/tasks",
            {
                "key": args.key,
                "destination": args.destination,
                "due_before": due_before.isoformat() if due_before else None,
                "due_after": due_after.isoformat() if due_after else None,
                "limit": args.limit,
                "cursor": args.cursor,
            },
        )
        _list(page["tasks"], page["cursor"], args.json)
        return 0
    async with Scheduler(settings) as scheduler:
        found = await scheduler.find(
            key=args.key,
            destination=args.destination,
            due_before=due_before,
            due_after=due_after,
            limit=args.limit,
            cursor=args.cursor,
        )
    _list([pending_json(t, whole=False) for t in found.tasks], found.cursor, args.json)
    return 0


async def _whole(task_id: str, settings: Settings, api: ApiClient | None) -> dict[str, Any]:
    """One pending task with payload and properties, as ``pending_json`` has it."""
    if api is not None:
        whole: dict[str, Any] = api.get(f"/v1/tasks/{quote(task_id, safe='')}")
        return whole
    async with Scheduler(settings) as scheduler:
        return await shown(scheduler, task_id)


def _api(settings: Settings) -> ApiClient | None:
    """The API the command asks instead of reading the journal (None: read it here)."""
    if settings.api_url is None:
        return None
    token = settings.http_token.get_secret_value() if settings.http_token else None
    return ApiClient(settings.api_url, token)


def _list(tasks: list[dict[str, Any]], cursor: str | None, as_json: bool) -> None:
    """A page of pending tasks (as ``pending_json`` has them), one line each."""
    for task in tasks:
        if as_json:
            print(json.dumps(task, ensure_ascii=False))
        else:
            keys = ",".join(task["keys"]) or "-"
            print(
                escape_controls(
                    f"{task['id']}  {task['destination']}  {task['due_at']}  "
                    f"attempt {task['attempt']}  {task['size']} B  keys {keys}"
                )
            )
    if cursor is not None:
        print(f"more: --cursor {cursor}", file=sys.stderr)
    elif not tasks and not as_json:
        print("no pending tasks match", file=sys.stderr)


def _show(whole: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(whole, ensure_ascii=False))
        return
    for name, value in whole.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        print(escape_controls(f"{name}: {shown}"))


async def run_reschedule(args: argparse.Namespace, settings: Settings) -> int:
    """``rmqdelay reschedule``."""
    at = iso_time(args.at, "--at") if args.at is not None else None
    if (api := _api(settings)) is not None:
        when_ = {"at": at.isoformat()} if at else {"delay_ms": round(args.delay / MS)}
        moved = api.patch(f"/v1/tasks/{quote(args.key, safe='')}", when_)
        task_id, destination, due_at, n_hops = (
            moved["id"], moved["destination"], moved["due_at"], moved["hops"],
        )  # fmt: skip
    else:
        async with Scheduler(settings) as scheduler:
            task = await scheduler.reschedule(args.key, delay=args.delay, at=at)
        task_id, destination, due_at, n_hops = (
            task.id, task.destination, task.due_at.isoformat(), task.hops,
        )  # fmt: skip
    print(
        escape_controls(
            f"rescheduled {task_id} for {destination}: now due {due_at} ({hops(n_hops)}); "
            "the old copy is cancelled"
        )
    )
    return 0


async def run_export(args: argparse.Namespace, settings: Settings) -> int:
    """``rmqdelay export FILE``."""
    async with Scheduler(settings) as scheduler:
        with _open(args.file, "w") as out:
            counts = await export(scheduler, out)
    print(counts.describe("exported"), file=sys.stderr)
    return 0


async def run_import(args: argparse.Namespace, settings: Settings) -> int:
    """``rmqdelay import FILE``."""
    with _open(args.file, "r") as source:
        items = read_export(source)  # the whole file is checked before anything is sent
    async with Scheduler(settings) as scheduler:
        counts = await import_items(scheduler, items)
    print(counts.describe("imported"), file=sys.stderr)
    return 0


async def run_transfer(
    args: argparse.Namespace, settings: Settings, secret: Callable[[Settings], None]
) -> int:
    """``rmqdelay transfer --to URL``."""
    fields = {**settings.model_dump(), "url": args.to}
    if args.to_namespace is not None:
        fields["namespace"] = args.to_namespace
    target_settings = Settings(**fields)
    secret(target_settings)
    if (target_settings.urls, target_settings.namespace) == (settings.urls, settings.namespace):
        raise ConfigError("--to names the same broker and namespace as the source")
    async with Scheduler(settings) as source, Scheduler(target_settings) as target:
        counts = await transfer(
            source,
            target,
            margin_s=args.margin.total_seconds(),
            progress=lambda line: print(line, file=sys.stderr),
        )
    print(counts.describe(f"moved to {target_settings.safe_url} ({target_settings.namespace}):"))
    return 0


def _open(path: str, mode: str) -> AbstractContextManager[TextIO]:
    if path == "-":
        return nullcontext(sys.stdout if mode == "w" else sys.stdin)
    try:
        return cast(TextIO, open(path, mode, encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot open {path!r}: {e.strerror}") from None
