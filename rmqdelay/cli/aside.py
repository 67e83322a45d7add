"""``rmqdelay parked ...`` and ``rmqdelay unroutable ...``: the same tools for both queues."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.errors import ConfigError
from rmqdelay.settings import Settings
from rmqdelay.tools.logs import escape_controls
from rmqdelay.tools.parking import AsideQueue, ParkingLot, UnroutableQueue

QUEUES: dict[str, tuple[str, Callable[[Scheduler], AsideQueue]]] = {
    "parked": ("parked tasks", ParkingLot),
    "unroutable": ("unroutable tasks (no work queue when they came due)", UnroutableQueue),
}


def add_parsers(commands: Any) -> None:
    """``parked`` and ``unroutable``, each with list (default), show, requeue, delete,
    purge."""
    for command, (what, _) in QUEUES.items():
        parser = commands.add_parser(
            command, help=f"list {what}; show, requeue, delete or purge them"
        )
        parser.add_argument("--limit", type=int, default=100, help="list at most this many")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")
        actions = parser.add_subparsers(dest="action", metavar="ACTION")
        actions.add_parser("list", help="list them (the default)")
        show = actions.add_parser("show", help="one task whole: payload, headers, properties")
        show.add_argument("id", metavar="ID")
        requeue = actions.add_parser("requeue", help="send tasks back to their destination now")
        requeue.add_argument("ids", nargs="*", metavar="ID")
        requeue.add_argument("--all", action="store_true", help="every one")
        delete = actions.add_parser("delete", help="delete just this task")
        delete.add_argument("id", metavar="ID")
        purge = actions.add_parser("purge", help="delete every one")
        purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


async def run(
    args: argparse.Namespace, settings: Settings, confirm: Callable[[str], Awaitable[bool]]
) -> int:
    """Carry out ``args.action`` on the queue ``args.command`` names; the exit code."""
    async with Scheduler(settings) as scheduler:
        aside = QUEUES[args.command][1](scheduler)
        if args.action == "requeue":
            return await _requeue(aside, args)
        if args.action == "purge":
            return await _purge(aside, args, confirm)
        if args.action == "show":
            return await _show(aside, args.id)
        if args.action == "delete":
            deleted = await aside.delete(args.id)
            if not deleted:
                print(escape_controls(f"{args.id}: not in {aside.place}"), file=sys.stderr)
                return 1
            print(f"deleted {deleted} message(s) with id {args.id} from {aside.queue}")
            return 0
        # Counted before the listing: the messages it gives back are not counted again
        # until the broker has them ready, so a count after it can say 0.
        total = await aside.count()
        for task in await aside.peek(args.limit):
            if args.json:
                print(json.dumps(task.as_json(), ensure_ascii=False))
            else:
                when = task.parked_at.isoformat(timespec="seconds") if task.parked_at else "-"
                line = f"{task.id}  {task.destination}  {when}  {task.attempts}  {task.reason}"
                print(escape_controls(line))  # ids and reasons are anyone's text
        if not args.json:
            print(f"{total} {args.command} in {aside.queue}", file=sys.stderr)
    return 0


async def _show(aside: AsideQueue, task_id: str) -> int:
    found = await aside.show(task_id)
    if found is None:
        print(escape_controls(f"{task_id}: not in {aside.place}"), file=sys.stderr)
        return 1
    print(json.dumps(found.as_json(), indent=2, ensure_ascii=False, default=str))
    return 0


async def _requeue(aside: AsideQueue, args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all:
        raise ConfigError("name the task ids to requeue, or pass --all (not both)")
    sent, stayed = await aside.requeue(None if args.all else set(args.ids))
    print(f"requeued {sent} {args.command} task(s) to their destinations")
    for line in stayed:
        print(escape_controls(f"  still in {aside.queue}: {line}"), file=sys.stderr)
    return 1 if stayed else 0


async def _purge(
    aside: AsideQueue, args: argparse.Namespace, confirm: Callable[[str], Awaitable[bool]]
) -> int:
    if not args.yes:
        prompt = f"delete all {await aside.count()} messages in {aside.queue}? [y/N] "
        if not await confirm(prompt):
            print("nothing purged")
            return 0
    print(f"purged {await aside.purge()} {args.command} task(s) from {aside.queue}")
    return 0
