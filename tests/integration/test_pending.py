"""``rmqdelay pending``: counts by the window their due time falls in, from the queues."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from rmqdelay import Pending, Scheduler, Settings, pending
from rmqdelay.broker.declare import apply_topology
from rmqdelay.cli.main import main
from rmqdelay.core.topology import build_topology

from .conftest import make_settings
from .helpers import use_in_cli

pytestmark = pytest.mark.integration


@pytest.fixture
async def month(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of its own that holds delays up to 30 days, and destination "dest"."""
    settings = make_settings(broker_url, max_delay=timedelta(days=30))
    topology = build_topology(settings.layout, ("dest",))
    await apply_topology(settings, topology)
    yield settings
    await apply_topology(settings, topology, delete=True)


def _in(found: Pending) -> dict[str, tuple[int, int, int]]:
    return {w.name: (w.in_levels, w.ready, w.held_or_running) for w in found.windows}


async def test_each_task_counts_in_the_window_its_level_bounds(
    month: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    delays = {
        "minute": [timedelta(seconds=25)],  # stays in the levels for the whole test
        "hour": [timedelta(minutes=30)] * 2,
        "day": [timedelta(hours=3)],
        "week": [timedelta(days=2)],
        "later": [timedelta(days=20)] * 3,
    }
    async with Scheduler(month) as scheduler:
        for spans in delays.values():
            for delay in spans:
                await scheduler.schedule("dest", {}, delay=delay)
        await scheduler.schedule("dest", "now", delay=0)  # no worker: it waits, ready
    expected = {
        "second": (0, 1, 0),
        "minute": (1, 0, 0),
        "hour": (2, 0, 0),
        "day": (1, 0, 0),
        "week": (1, 0, 0),
        "later": (3, 0, 0),
    }
    found = await pending(month)
    async with asyncio.timeout(30):  # the management API samples every 5 s
        while _in(found) != expected:
            await asyncio.sleep(0.5)
            found = await pending(month)
    assert [(d.destination, d.ready) for d in found.destinations] == [("dest", 1)]
    assert found.sampled_at
    use_in_cli(monkeypatch, month)
    assert await asyncio.to_thread(main, ["pending", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [w["total"] for w in document["windows"]] == [1, 1, 2, 1, 1, 3]
    assert "2^(k+1) units" in document["precision"]
    assert await asyncio.to_thread(main, ["pending"]) == 0
    assert "1 hour" in capsys.readouterr().out
