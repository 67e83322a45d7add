"""`rmqdelay parked`: list without consuming, requeue, purge."""

from __future__ import annotations

import asyncio
import json

import pytest

from rmqdelay import RetryPolicy, Scheduler, Settings, Task
from rmqdelay.tools.cli import RET_ERROR, RET_OK, main

from .helpers import Recorder, depth, get_all, running_worker, use_in_cli

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
