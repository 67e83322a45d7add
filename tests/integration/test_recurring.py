"""Recurring series on the real broker: they live in their one pending occurrence."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import Counter
from datetime import timedelta

import aio_pika
import pytest

from rmqdelay import InvalidRecurrenceError, Scheduler, Settings, UnroutableError
from rmqdelay.cli.main import main

from .conftest import TestBroker, cannot
from .helpers import (
    Recorder,
    depth,
    get_all,
    kill_a_worker_mid_handler,
    running_worker,
    use_in_cli,
)

pytestmark = pytest.mark.integration


class Occurrences(Recorder):
    """Records executions with their due times, so that doubles show."""

    def per_due(self) -> Counter[float]:
        return Counter(task.due_at.timestamp() for task, _ in self.runs)

    async def wait_count(self, n: int, within: float) -> None:
        async with asyncio.timeout(within):
            while len(self.runs) < n:
                self._changed.clear()
                await self._changed.wait()


async def test_an_interval_series_runs_on_time_until_cancelled(
    settings: Settings, destination: str
) -> None:
    runs = Occurrences()
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        series = await scheduler.recurring(
            destination, {"beat": 1}, every=timedelta(seconds=1), key=f"hb-{destination}"
        )
        assert series.rule == "every 1s"
        assert len(series.upcoming) == 3
        async with running_worker(settings, destination, runs) as worker:
            await runs.wait_count(3, within=30)
            listed = {s.key: s for s in await scheduler.series()}
            assert listed[series.key].destination == destination
            await scheduler.cancel(series.key)
            await worker.wait_for(lambda s: s.cancelled >= 1)  # the pending one, when due
            executed = worker.stats.executed
        assert series.key not in {s.key for s in await scheduler.series()}
    dues = sorted(runs.per_due())
    assert all(b - a == pytest.approx(1.0, abs=0.002) for a, b in itertools.pairwise(dues))
    assert set(runs.per_due().values()) == {1}, "each due time ran once"
    assert min(runs.lateness_ms().values()) >= 0
    assert executed == len(runs.runs), "nothing ran after the cancel"


async def test_adding_under_an_existing_key_replaces_the_series(
    settings: Settings, destination: str
) -> None:
    runs = Occurrences()
    key = f"replace-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        await scheduler.recurring(destination, "old", every=1, key=key)
        await scheduler.recurring(destination, "new", every=1, key=key)
        async with running_worker(settings, destination, runs) as worker:
            await runs.wait_count(3, within=30)
            await worker.wait_for(lambda s: s.cancelled >= 1)  # the old one's occurrence
            [listed] = [s for s in await scheduler.series() if s.key == key]
            await scheduler.remove_series(key)
    assert {task.payload for task, _ in runs.runs} == {"new"}
    assert listed.rule == "every 1s"


async def test_two_workers_share_a_series_without_doubling_it(
    settings: Settings, destination: str
) -> None:
    runs = Occurrences()
    key = f"two-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        await scheduler.recurring(destination, {}, every=1, key=key)
        async with (
            running_worker(settings, destination, runs),
            running_worker(settings, destination, runs),
        ):
            await runs.wait_count(4, within=30)
            await scheduler.remove_series(key)
    assert set(runs.per_due().values()) == {1}


async def test_a_worker_killed_between_run_and_ack_leaves_one_series(
    settings: Settings, destination: str
) -> None:
    """The killed worker scheduled the next occurrence before running the handler; the
    redelivered occurrence schedules it again, and that copy cancels the first."""
    key = f"killed-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        first = await scheduler.recurring(destination, "tick", every=1, key=key)
        await kill_a_worker_mid_handler(settings, destination)
        runs = Occurrences()
        async with running_worker(settings, destination, runs) as worker:
            await runs.wait_count(4, within=30)
            await worker.wait_for(lambda s: s.cancelled >= 1)  # the doubled next one
            await scheduler.remove_series(key)
    per_due = runs.per_due()
    assert runs.runs[0][0].redelivered
    assert runs.runs[0][0].due_at == first.upcoming[0]
    assert set(per_due.values()) == {1}, f"one run per due time: {per_due}"


@pytest.mark.parametrize(("policy", "expected_late_runs"), [("once", 1), ("skip", 0)])
async def test_after_downtime_the_series_catches_up_as_told(
    settings: Settings, destination: str, policy: str, expected_late_runs: int
) -> None:
    """No worker for 3.5 intervals: ``once`` runs the overdue occurrence once, ``skip``
    passes over it; both go on at the next fire time after now, never in a burst."""
    runs = Occurrences()
    key = f"late-{policy}-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        series = await scheduler.recurring(destination, {}, every=1, key=key, catch_up=policy)
        await asyncio.sleep(3.5)  # the downtime under test, not a synchronisation
        async with running_worker(settings, destination, runs) as worker:
            await runs.wait_count(expected_late_runs + 2, within=30)
            await scheduler.remove_series(key)
        skipped = worker.stats.skipped
    late = [t for t, ran in runs.runs if ran - t.due_at.timestamp() > 1.5]
    assert len(late) == expected_late_runs
    assert skipped == 1 - expected_late_runs
    on_time = sorted(t.due_at.timestamp() for t, _ in runs.runs if t not in late)
    assert on_time[0] >= series.upcoming[0].timestamp() + 3, "went on from now"


async def test_catch_up_all_runs_each_missed_occurrence(
    settings: Settings, destination: str
) -> None:
    runs = Occurrences()
    key = f"all-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        series = await scheduler.recurring(destination, {}, every=1, key=key, catch_up="all")
        await asyncio.sleep(3.5)  # the downtime under test, not a synchronisation
        async with running_worker(settings, destination, runs):
            await runs.wait_count(4, within=30)
            await scheduler.remove_series(key)
    dues = sorted(runs.per_due())[:4]
    start = series.upcoming[0].timestamp()
    assert dues == pytest.approx([start, start + 1, start + 2, start + 3], abs=0.002)


async def test_refusals_name_the_bad_value(settings: Settings, destination: str) -> None:
    async with Scheduler(settings) as scheduler:
        with pytest.raises(UnroutableError, match=destination):
            await scheduler.recurring(destination, {}, every=5, key="k")
        await scheduler.declare_destination(destination)
        with pytest.raises(InvalidRecurrenceError, match="'Europe/Nowhere'"):
            await scheduler.recurring(
                destination, {}, cron="0 8 * * *", tz="Europe/Nowhere", key="k"
            )
        with pytest.raises(InvalidRecurrenceError, match=re.escape("'99 * * * *'")):
            await scheduler.recurring(destination, {}, cron="99 * * * *", key="k")
        with pytest.raises(InvalidRecurrenceError, match="'never'"):
            await scheduler.recurring(destination, {}, every=5, key="k", catch_up="never")


@pytest.mark.timeout(300)
async def test_a_series_survives_a_broker_restart(
    settings: Settings, destination: str, test_broker: TestBroker
) -> None:
    if test_broker.control is None:
        cannot("RMQDELAY_TEST_BROKER_CONTROL is not set: this test kills the broker")
    runs = Occurrences()
    key = f"restart-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        await scheduler.recurring(destination, {}, every=1, key=key)
        async with running_worker(settings, destination, runs):
            await runs.wait_count(2, within=30)
            await asyncio.to_thread(test_broker.kill_and_restart)
            before = len(runs.runs)
            await runs.wait_count(before + 3, within=120)
            await scheduler.remove_series(key)
    per_due = runs.per_due()
    # A kill -9 may lose an ack (that occurrence runs again) but never the series, and
    # never leaves two pending: later due times run once each.
    last = sorted(per_due)[-3:]
    assert [per_due[d] for d in last] == [1, 1, 1]


async def test_cli_adds_lists_and_removes_a_series(
    settings: Settings,
    destination: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_in_cli(monkeypatch, settings)
    key = f"cli-{destination}"
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
    add = [
        "recurring", "add", destination, '{"kind": "daily"}', "--cron", "0 8 * * *",
        "--tz", "Europe/Berlin", "--key", key,
    ]  # fmt: skip
    assert await asyncio.to_thread(main, add) == 0
    assert "cron '0 8 * * *' (Europe/Berlin)" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["recurring", "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [mine] = [s for s in listed if s["key"] == key]
    assert mine["destination"] == destination
    assert all(t.endswith(("+01:00", "+02:00")) for t in mine["upcoming"])
    assert all("T08:00:00" in t for t in mine["upcoming"])
    assert await asyncio.to_thread(main, ["recurring", "remove", key]) == 0
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["recurring", "list"]) == 0
    listing = capsys.readouterr()
    assert key not in listing.out
    assert "cancellation set" not in listing.err, "the list, not the stream's progress"
    # gone now: a second remove says so, and fails
    assert await asyncio.to_thread(main, ["recurring", "remove", key]) == 1
    assert f"no series under key {key!r}" in capsys.readouterr().err
    bad = ["recurring", "add", destination, "{}", "--every", "30s", "--key", key, "--tz", "X/Y"]
    assert await asyncio.to_thread(main, bad) == 1
    assert "'X/Y'" in capsys.readouterr().err


def test_cli_preview_shows_both_daylight_saving_changes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "recurring", "preview", "--cron", "30 2 * * *", "--tz", "Europe/Berlin",
        "--count", "2", "--from",
    ]  # fmt: skip
    assert main([*argv, "2026-03-28T12:00:00+01:00"]) == 0
    assert main([*argv, "2026-10-24T12:00:00+02:00"]) == 0
    out = capsys.readouterr().out
    assert "2026-03-29T03:00:00+02:00" in out, "02:30 does not exist: fires at 03:00"
    assert "2026-10-25T02:30:00+02:00" in out
    assert "2026-10-25T02:30:00+01:00" not in out, "the repeated 02:30 fires once"
    assert "UTC offset +0200 -> +0100" in out


async def test_an_occurrence_doubled_by_the_broker_does_not_fork_the_series(
    settings: Settings, destination: str
) -> None:
    """A quorum queue's at-least-once dead-lettering can repeat a message after a crash:
    here a copy of an occurrence is put beside it in the work queue. Both run (delivery is
    at least once), both schedule the next occurrence, and the newer copy cancels the
    older: later due times run once each."""
    key = f"double-{destination}"
    queue = settings.names.work_queue(destination)
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        first = await scheduler.recurring(destination, "tick", every=1, key=key)
        async with asyncio.timeout(30):  # no worker yet: it waits in the work queue
            while await depth(settings, queue) < 1:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.05)
        [original] = await get_all(settings, queue)
        channel = await scheduler.connection.channel(publisher_confirms=True)
        work = await channel.get_exchange(settings.names.work_exchange, ensure=False)
        await work.publish(
            aio_pika.Message(
                original.body,
                headers=original.headers,
                content_type=original.content_type,
                message_id="copy",
            ),
            routing_key=destination,
        )
        runs = Occurrences()
        async with running_worker(settings, destination, runs) as worker:
            await runs.wait_count(5, within=30)
            await worker.wait_for(lambda s: s.cancelled >= 1)  # the older next copy
            await scheduler.remove_series(key)
    per_due = runs.per_due()
    assert per_due[first.upcoming[0].timestamp()] == 2, "the doubled one ran twice"
    later = [n for due, n in per_due.items() if due != first.upcoming[0].timestamp()]
    assert later
    assert set(later) == {1}, f"one run per later due time: {per_due}"
