"""``rmqdelay export``, ``import`` and ``transfer``: pending tasks, live cancels and
recurring series out of one broker (or namespace) and into another, kept exactly.

Every copy keeps its id, keys, due time, attempt, publish stamp, properties and body; only
its route is computed anew for the broker it goes to. Keeping the publish stamp keeps
cancels meaningful across the move: a cancel made on the new broker after a task was
scheduled calls it off there too, even before the transfer has brought it over.

Import and transfer skip a task the target's journal already has a copy of (same id,
same stamp or later) or has cancelled, so running either again, or after a crash, does
not double anything. A transfer publishes each batch on the target (confirmed) before it
cancels it on the source (by id at its stamp: that copy only); a crash in between leaves
both copies, and the task runs once on each side (never twice on one). Tasks due within
the margin are left where they are: a source worker may be about to run them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from rmqdelay.broker.cancels import publish_cancel
from rmqdelay.broker.journal import read_journal
from rmqdelay.broker.publisher import restored
from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.broker.streams import read_stream
from rmqdelay.core.errors import ConfigError, PublishNotConfirmedError, UnroutableError
from rmqdelay.core.journal import (
    FORMAT,
    Entry,
    Imported,
    TaskIndex,
    cancel_line,
    read_line,
    series_line,
    task_line,
)
from rmqdelay.core.recurrence import compact, series_record

log = logging.getLogger(__name__)

#: Tasks published (and then cancelled on the source) together.
BATCH = 1000
#: A transfer leaves tasks due sooner than this on the source, for its workers.
DEFAULT_MARGIN_S = 30.0
#: Transfer passes: each picks up what publishers scheduled on the source meanwhile.
PASSES = 3


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Counts:
    """What an export, import or transfer did."""

    tasks: int = 0
    cancels: int = 0
    series: int = 0
    #: Tasks the target had already (a copy with the same stamp or later), or had cancelled.
    already: int = 0
    #: Tasks left on the source: due within the margin.
    left: int = 0
    #: Tasks of the file whose due time had passed: imported, they run at once.
    overdue: int = 0
    #: Moved tasks that came due before the source confirmed their cancel (a broker
    #: slower than the margin): they may run on both sides.
    late: int = 0
    #: Tasks waiting in the source's levels that its journal does not have (scheduled
    #: before its retention, or before it was turned on): not exported, not moved.
    uncovered: int = 0

    def describe(self, verb: str) -> str:
        parts = [f"{verb} {self.tasks} tasks, {self.cancels} cancels, {self.series} series"]
        if self.already:
            parts.append(f"{self.already} tasks were there already (or cancelled there)")
        if self.overdue:
            parts.append(f"{self.overdue} were past due and run at once")
        if self.left:
            parts.append(f"{self.left} due within the margin were left to the source's workers")
        if self.late:
            parts.append(
                f"WARNING: {self.late} came due before the source confirmed their cancel and "
                "may run on both brokers (use a larger --margin)"
            )
        if self.uncovered:
            parts.append(
                f"WARNING: about {self.uncovered} tasks waiting in the levels are not in the "
                "journal (scheduled before the journal was on, or kept by no worker for half "
                "of RMQDELAY_JOURNAL_RETENTION), so they were left out: they stay with the "
                "source's workers"
            )
        return "; ".join(parts)


async def in_levels(scheduler: Scheduler) -> int:
    """Messages waiting in the delay levels now (passive declares: exact and live)."""
    layout, names = scheduler.wiring.layout, scheduler.wiring.names
    channel = await scheduler.connection.channel()
    try:
        total = 0
        for shard in range(layout.shards):
            for level in range(layout.levels):
                queue = await channel.declare_queue(names.level_queue(level, shard), passive=True)
                total += queue.declaration_result.message_count or 0
        return total
    finally:
        await channel.close()


def uncovered(index: TaskIndex, counted_at_ms: int, counted: int) -> int:
    """How many of ``counted`` tasks in the levels at ``counted_at_ms`` the journal lacks.
    A task still in a level then is due after then, so its copy (pending or cancelled) is
    among those due later; anything beyond them is missing from the journal."""
    known = sum(1 for e in index.all() if e.due_ms > counted_at_ms)
    return max(0, counted - known)


async def _series_records(scheduler: Scheduler, index: TaskIndex) -> list[bytes]:
    """The live series registry records (less those whose key was cancelled since)."""
    records = await read_stream(scheduler.connection, scheduler.wiring.names.series)
    live = compact([record.body for record in records])
    return [
        series_record(header, destination)
        for header, destination in live.values()
        if index.cancels.cancelled_by((header.key,), header.since_ms) is None
    ]


async def export(scheduler: Scheduler, out: TextIO) -> Counts:
    """Write every pending task, live cancel and recurring series as JSON lines."""
    counted_at, counted = _now_ms(), await in_levels(scheduler)
    index = await read_journal(scheduler.settings, scheduler.connection)
    now_ms, counts = _now_ms(), Counts(uncovered=uncovered(index, counted_at, counted))
    about = {
        "format": FORMAT,
        "namespace": scheduler.settings.namespace,
        "exported_at": datetime.now(UTC).isoformat(),
    }
    out.write(json.dumps(about) + "\n")
    for entry in index.pending(now_ms):
        out.write(json.dumps(task_line(entry), ensure_ascii=False) + "\n")
        counts.tasks += 1
    for key, at_ms, until_ms in index.cancels.items():
        out.write(json.dumps(cancel_line(key, at_ms, until_ms), ensure_ascii=False) + "\n")
        counts.cancels += 1
    for record in await _series_records(scheduler, index):
        out.write(json.dumps(series_line(record)) + "\n")
        counts.series += 1
    return counts


def read_export(lines: Iterable[str]) -> list[Imported]:
    """Every line of an export, checked before anything is sent.

    Raises:
        ConfigError: not an export, or a line that cannot be read (naming the line).
    """
    items = iter(lines)
    first = next(items, "")
    try:
        about = json.loads(first)
    except ValueError:
        about = None
    if not isinstance(about, dict) or about.get("format") != FORMAT:
        raise ConfigError(f"not an rmqdelay export: its first line is not {{'format': {FORMAT!r}}}")
    read = []
    for number, text in enumerate(items, start=2):
        if text.strip():
            try:
                read.append(read_line(text, number))
            except ValueError as e:
                raise ConfigError(f"cannot import: {e}") from None
    return read


async def import_items(scheduler: Scheduler, items: list[Imported]) -> Counts:
    """Schedule what an export holds into ``scheduler``'s broker and namespace."""
    tasks = [i.entry for i in items if i.entry is not None]
    await _require_destinations(scheduler, {e.destination for e in tasks})
    target = await read_journal(scheduler.settings, scheduler.connection)
    counts = await _copy_cancels_and_series(
        scheduler,
        target,
        [i.cancel for i in items if i.cancel is not None],
        [i.series for i in items if i.series is not None],
    )
    now_ms = _now_ms()
    fresh = [e for e in tasks if not _there(target, e)]
    counts.already = len(tasks) - len(fresh)
    counts.overdue = sum(1 for e in fresh if e.due_ms <= now_ms)
    for batch in _batches(fresh):
        await _publish_all(scheduler, batch)
        counts.tasks += len(batch)
    return counts


async def transfer(
    source: Scheduler,
    target: Scheduler,
    *,
    margin_s: float = DEFAULT_MARGIN_S,
    progress: Callable[[str], None] = lambda _: None,
) -> Counts:
    """Move every pending task, live cancel and series from ``source`` to ``target``."""
    counted_at, counted = _now_ms(), await in_levels(source)
    index = await read_journal(source.settings, source.connection)
    await _require_destinations(target, {e.destination for e in index.pending(_now_ms())})
    there = await read_journal(target.settings, target.connection)
    counts = await _copy_cancels_and_series(
        target, there, list(index.cancels.items()), await _series_records(source, index)
    )
    counts.uncovered = uncovered(index, counted_at, counted)
    moved: set[tuple[str, int]] = set()
    left: set[tuple[str, int]] = set()
    for number in range(1, PASSES + 1):
        if number > 1:  # what publishers scheduled on the source meanwhile
            index = await read_journal(source.settings, source.connection)
        todo = [e for e in index.pending(_now_ms()) if (e.id, e.published_ms) not in moved]
        if not todo or all((e.id, e.published_ms) in left for e in todo):
            break
        # The source's cancels of one batch go out while the next batch is published.
        cancelling: asyncio.Task[None] | None = None
        try:
            for batch in _batches(todo):
                going = await _copy(target, there, batch, margin_s, counts, left)
                if cancelling is not None:
                    await cancelling
                cancelling = asyncio.ensure_future(_call_off(source, going, counts, moved))
            if cancelling is not None:
                await cancelling
        finally:
            if cancelling is not None and not cancelling.done():
                cancelling.cancel()
        progress(f"pass {number}: {len(moved)} tasks moved so far")
    counts.left = len(left - moved)
    if counts.late:
        log.warning(
            "%d moved tasks came due before the source confirmed their cancel: they may "
            "run on both brokers (the broker was slow; a larger --margin avoids it)",
            counts.late,
        )
    return counts


async def _copy(
    target: Scheduler,
    there: TaskIndex,
    batch: list[Entry],
    margin_s: float,
    counts: Counts,
    left: set[tuple[str, int]],
) -> list[Entry]:
    """Copy one batch to the target; return the entries to call off on the source.

    A task due within the margin stays with the source. The margin is checked again once
    the target has confirmed (a slow broker eats into it): what came within half of it
    stays with the source too, and its copy is cancelled on the target.
    """
    margin_ms = margin_s * 1000
    soon = _now_ms() + margin_ms  # one reading: every entry is either ready or left
    ready = [e for e in batch if e.due_ms > soon]
    left.update((e.id, e.published_ms) for e in batch if e.due_ms <= soon)
    fresh = [e for e in ready if not _there(there, e)]
    await _publish_all(target, fresh)
    close = _now_ms() + margin_ms / 2
    back = {(e.id, e.published_ms) for e in fresh if e.due_ms <= close}
    if back:
        await _gather(
            [
                publish_cancel(target.publisher, target.wiring.names, task_id, stamp, None)
                for task_id, stamp in back
            ],
            "cancelling on the target the copies that came close to due",
        )
        left.update(back)
    counts.tasks += sum(1 for e in fresh if (e.id, e.published_ms) not in back)
    counts.already += len(ready) - len(fresh)
    return [e for e in ready if (e.id, e.published_ms) not in back]


async def _call_off(
    source: Scheduler, going: list[Entry], counts: Counts, moved: set[tuple[str, int]]
) -> None:
    """Cancel on the source the tasks the target has confirmed (each at its own stamp);
    count as ``late`` those that came due before the source confirmed: they may have run
    there too."""
    publisher, names = source.publisher, source.wiring.names
    await _gather(
        [publish_cancel(publisher, names, e.id, e.published_ms, None) for e in going],
        "cancelling moved tasks on the source",
    )
    confirmed = _now_ms()
    counts.late += sum(1 for e in going if e.due_ms <= confirmed)
    moved.update((e.id, e.published_ms) for e in going)


def _there(index: TaskIndex, entry: Entry) -> bool:
    """Whether the target has this copy (or a later one) or has called it off."""
    if index.copy_of(entry.id, entry.published_ms):
        return True
    return index.cancels.cancelled_by((entry.id, *entry.keys), entry.published_ms) is not None


async def _require_destinations(scheduler: Scheduler, destinations: set[str]) -> None:
    missing = []
    for destination in sorted(destinations):
        try:
            await scheduler.require_destination(destination)
        except UnroutableError:  # say all of them at once
            missing.append(destination)
    if missing:
        shown = " ".join(missing)
        raise ConfigError(
            f"the target has no work queue for {', '.join(map(repr, missing))}: start their "
            f"workers there, or 'rmqdelay declare {shown}' against it; nothing was sent"
        )


async def _copy_cancels_and_series(
    scheduler: Scheduler,
    target: TaskIndex,
    cancels: list[tuple[str, int, int]],
    series: list[bytes],
) -> Counts:
    """Cancels the target does not know yet, then series records it lacks. Cancels first:
    a series or task copied after them must not outlive a cancel that stops it."""
    counts = Counts()
    publisher, names = scheduler.publisher, scheduler.wiring.names
    wanted = [c for c in cancels if target.cancels.cancelled_by((c[0],), c[1]) is None]
    for batch in _batches(wanted):
        await _gather(
            [publish_cancel(publisher, names, key, at, until) for key, at, until in batch],
            "copying cancels",
        )
    counts.cancels = len(wanted)
    have = set(await _series_records(scheduler, target)) if series else set()
    for record in series:
        if record not in have:
            await scheduler.publish_series_record(record)
            counts.series += 1
    return counts


async def _publish_all(scheduler: Scheduler, entries: list[Entry]) -> None:
    await _gather([_publish(scheduler, e) for e in entries], "publishing tasks")


async def _publish(scheduler: Scheduler, entry: Entry) -> None:
    """Publish a copy of ``entry`` routed for its due time on this broker."""
    way = scheduler.wiring.route(max(0, entry.due_ms - _now_ms()) * 1000, entry.id)
    props = restored(entry.content_type, {**entry.headers, **way.headers}, entry.properties)
    await scheduler.publisher.publish(
        entry.body,
        props,
        way.exchange,
        entry.destination,
        mandatory=way.mandatory,
        what=f"the task {entry.id} for {entry.destination!r}",
    )


async def _gather(calls: list[Any], what: str) -> None:
    """Run ``calls`` together; raise the first failure once all have settled (the rest
    were confirmed, and running again skips them)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise PublishNotConfirmedError(
            f"{what}: {len(failed)} of {len(results)} were not confirmed (the first: "
            f"{type(failed[0]).__name__}: {failed[0]}); run the command again: what was "
            "confirmed is skipped"
        ) from failed[0]


def _batches(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]
