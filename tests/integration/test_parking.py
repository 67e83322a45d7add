"""`rmqdelay parked`: list without consuming, requeue, purge."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from rmqdelay import RetryPolicy, Scheduler, Settings, Task
from rmqdelay.broker.declare import apply_topology
from rmqdelay.cli.main import RET_ERROR, RET_OK, main
from rmqdelay.core.topology import destination_topology
from rmqdelay.tools.aside_log import AsideLog
from rmqdelay.tools.parking import ParkingLot

from .helpers import (
    Recorder,
    depth,
    get_all,
    running_worker,
    strand,
    subprocess_env,
    use_in_cli,
)

pytestmark = pytest.mark.integration


async def _park(settings: Settings, destination: str, count: int) -> list[str]:
    async def broken(task: Task) -> None:
        raise LookupError(f"no such account {task.payload['n']}")

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    await get_all(settings, settings.names.parked, ack=True)  # start from an empty lot
    async with (
        running_worker(settings, destination, broken, retry=once) as worker,
        Scheduler(settings) as scheduler,
    ):
        ids = [
            (await scheduler.schedule(destination, {"n": n}, delay=0, keys=[f"acct:{n}"])).id
            for n in range(count)
        ]
        async with asyncio.timeout(10):
            await worker.wait_for(lambda st: st.parked == count)
    return ids


def test_parked_lists_requeues_and_purges(
    settings: Settings,
    destination: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_in_cli(monkeypatch, settings)
    ids = asyncio.run(_park(settings, destination, 3))
    common = ["--url", settings.url, "--namespace", settings.namespace]

    assert main([*common, "parked", "--json"]) == RET_OK
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(t["id"] for t in listed) == sorted(ids)
    assert {t["error"] for t in listed} == {"LookupError"}
    assert all(t["destination"] == destination and t["attempts"] == 1 for t in listed)
    assert asyncio.run(depth(settings, settings.names.parked)) == 3, "listing consumed nothing"
    # A reader that went away ('parked --json | head -1'): a quiet exit, no traceback.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        gone = subprocess.run(
            [sys.executable, "-m", "rmqdelay", "parked", "--json"], stdout=writer,
            stderr=subprocess.PIPE, text=True, env=subprocess_env(settings), timeout=60,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert (gone.returncode, gone.stderr) == (RET_ERROR, "")
    assert main([*common, "parked"]) == RET_OK
    text = capsys.readouterr()
    assert len(text.out.splitlines()) == 3
    assert text.err.startswith(f"3 parked in {settings.names.parked}"), "counted as listed"

    assert main([*common, "parked", "requeue", ids[0], "no-such-id"]) == RET_ERROR
    captured = capsys.readouterr()
    assert "requeued 1 parked task(s)" in captured.out
    assert "no-such-id: not in the parking lot" in captured.err

    async def run_requeued() -> Task:
        recorder = Recorder()
        async with running_worker(settings, destination, recorder):
            await recorder.wait_for({ids[0]}, within=10)
        return recorder.runs[0][0]

    rerun = asyncio.run(run_requeued())
    assert (rerun.attempt, rerun.keys, rerun.payload) == (1, ("acct:0",), {"n": 0})
    assert asyncio.run(depth(settings, settings.names.parked)) == 2

    assert main([*common, "parked", "purge"]) == RET_ERROR  # no terminal to confirm on
    assert "pass --yes" in capsys.readouterr().err
    assert main([*common, "parked", "purge", "--yes"]) == RET_OK
    assert "purged 2 parked task(s)" in capsys.readouterr().out
    assert asyncio.run(depth(settings, settings.names.parked)) == 0


async def test_parked_show_prints_one_task_whole_and_delete_removes_just_it(
    own_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await _park(own_settings, "dest", 2)
    use_in_cli(monkeypatch, own_settings)
    assert await asyncio.to_thread(main, ["parked", "show", ids[0]]) == RET_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == ids[0]
    assert json.loads(shown["payload"]) == {"n": 0}
    assert shown["headers"]["rmqdelay-keys"] == ["acct:0"]
    assert "LookupError" in shown["reason"]
    assert shown["properties"]["message_id"] == ids[0]
    assert await asyncio.to_thread(main, ["parked", "delete", ids[0]]) == RET_OK
    assert await asyncio.to_thread(main, ["parked", "show", ids[0]]) == RET_ERROR
    assert f"{ids[0]}: not in the parking lot" in capsys.readouterr().err
    left = await get_all(own_settings, own_settings.names.parked)
    assert [m.headers["rmqdelay-id"] for m in left] == [ids[1]], "only that one went"
    assert await asyncio.to_thread(main, ["parked", "delete", "no-such-id"]) == RET_ERROR


async def test_unroutable_lists_shows_and_requeues_what_lost_its_destination(
    own_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination deleted while its tasks waited: they end in the unroutable queue;
    once it exists again, requeue delivers them."""
    settings, names = own_settings, own_settings.names
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination("gone")
        kept = await scheduler.schedule("gone", {"n": 1}, delay=0.3, keys=["k1"])
        other = await scheduler.schedule("gone", {"n": 2}, delay=0.3)
        await strand(scheduler, "gone", 2)
    use_in_cli(monkeypatch, settings)
    assert await asyncio.to_thread(main, ["unroutable", "--json"]) == RET_OK
    listed = {t["id"]: t for t in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(listed) == {kept.id, other.id}
    assert listed[kept.id]["destination"] == "gone"
    assert "no work queue for destination 'gone'" in listed[kept.id]["reason"]
    assert await asyncio.to_thread(main, ["unroutable", "show", kept.id]) == RET_OK
    assert json.loads(capsys.readouterr().out)["headers"]["rmqdelay-keys"] == ["k1"]
    # Still no queue: the requeue is refused by name and the task stays.
    assert await asyncio.to_thread(main, ["unroutable", "requeue", kept.id]) == RET_ERROR
    assert "gone" in capsys.readouterr().err
    assert await depth(settings, names.unroutable) == 2
    recorder = Recorder()
    try:
        async with running_worker(settings, "gone", recorder):  # declares the queue again
            assert await asyncio.to_thread(main, ["unroutable", "requeue", kept.id]) == RET_OK
            await recorder.wait_for({kept.id}, within=20)
            assert await asyncio.to_thread(main, ["unroutable", "purge", "--yes"]) == RET_OK
    finally:  # own_settings removes the namespace's 'dest' queue, not this one
        await apply_topology(settings, destination_topology(settings.layout, "gone"), delete=True)
    assert "purged 1 unroutable task(s)" in capsys.readouterr().out
    assert recorder.runs[0][0].payload == {"n": 1}
    assert recorder.runs[0][0].keys == ("k1",), "its keys came back with it"
    assert await depth(settings, names.unroutable) == 0


async def test_show_reads_the_log_while_it_accounts_for_the_lot_and_takes_the_lot_after(
    own_settings: Settings,
) -> None:
    settings, names = own_settings, own_settings.names
    ids = await _park(settings, "dest", 3)
    async with Scheduler(settings) as scheduler:
        logged = ParkingLot(scheduler, AsideLog(names.aside_log(names.parked)))
        taken = ParkingLot(scheduler)

        async def shown_from_log(task_id: str) -> bool | None:
            copy = await logged.show(task_id)
            return None if copy is None else copy.logged

        # The copy the broker logged is the message the lot holds.
        copy, whole = await logged.show(ids[2]), await taken.show(ids[2])
        assert copy is not None
        assert whole is not None
        assert (copy.logged, whole.logged) == (True, False)
        assert (copy.task, copy.body) == (whole.task, whole.body)
        assert copy.content_type == whole.content_type
        assert json.loads(copy.body) == {"n": 2}
        assert copy.task.error == "LookupError"
        # What a tool takes out is recorded in the log: gone, and the rest still read there.
        assert await taken.delete(ids[0]) == 1
        assert await shown_from_log(ids[0]) is None
        assert await shown_from_log(ids[1]) is True
        # A consumer of someone else's takes one unseen: the log no longer adds up, and the
        # lot itself is taken (and answers right).
        channel = await scheduler.connection.channel()
        outsider = await (await channel.get_queue(names.parked, ensure=False)).get()
        await outsider.ack()
        await channel.close()
        gone = str(outsider.headers["rmqdelay-id"])
        left = ({ids[1], ids[2]} - {gone}).pop()
        assert await shown_from_log(gone) is None
        assert await shown_from_log(left) is False
        # A purge is recorded too: after it, the log adds up again.
        assert await taken.purge() == 1
        (again,) = await _park(settings, "dest", 1)
        assert await shown_from_log(again) is True
        assert await shown_from_log(left) is None
