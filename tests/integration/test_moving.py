"""Export, import and transfer between namespaces of one real broker (the transfer between
RabbitMQ 3.10 and 4.3 is tests/transfer)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from rmqdelay import ConfigError, PublishNotConfirmedError, Scheduler, Settings
from rmqdelay.broker.cancels import publish_cancel
from rmqdelay.broker.declare import apply_topology
from rmqdelay.cli.main import main
from rmqdelay.core.topology import build_topology
from rmqdelay.tools import moving

from .conftest import make_settings
from .helpers import Recorder, running_worker, use_in_cli

pytestmark = pytest.mark.integration


@pytest.fixture
async def other(broker_url: str) -> AsyncIterator[Settings]:
    """A second namespace with the destination ``dest``, deleted afterwards."""
    settings = make_settings(broker_url, max_delay=timedelta(hours=1))
    await apply_topology(settings, build_topology(settings.layout, ("dest",)))
    yield settings
    await apply_topology(settings, build_topology(settings.layout, ("dest",)), delete=True)


def _view(task: Any) -> tuple[Any, ...]:
    """What must survive a move, exactly."""
    return (
        task.id,
        task.destination,
        task.due_at,
        task.attempt,
        task.keys,
        task.published_at,
        task.content_type,
        task.body,
        dict(task.headers),
        dict(task.properties),
    )


async def _export(settings: Settings) -> str:
    out = io.StringIO()
    async with Scheduler(settings) as scheduler:
        await moving.export(scheduler, out)
    return out.getvalue()


async def test_export_then_import_twice_keeps_everything_exactly_and_doubles_nothing(
    own_settings: Settings, other: Settings
) -> None:
    incident = f"incident:{uuid.uuid4().hex[:8]}"
    async with Scheduler(own_settings) as source:
        plain = await source.schedule("dest", {"step": "escalate"}, delay=600, keys=[incident])
        raw = await source.schedule(
            "dest", b"\x00\xffbytes", delay=900, content_type="application/octet-stream"
        )
        await source.schedule("dest", {}, delay=700, keys=["gone"])
        await source.cancel("gone")
        await source.recurring("dest", {"beat": 1}, key="heartbeat", every=3600)
        # Another client's task, with properties of its own.
        async with await aio_pika.connect(own_settings.url) as connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(own_settings.names.schedule_exchange)
            foreign_id = uuid.uuid4().hex
            due = plain.due_at.timestamp() * 1000 // 1 + 1000
            await exchange.publish(
                aio_pika.Message(
                    b'{"from":"go"}',
                    content_type="application/json",
                    correlation_id="c-1",
                    app_id="billing",
                    reply_to="answers",
                    delivery_mode=2,
                    headers={
                        "rmqdelay-id": foreign_id,
                        "rmqdelay-due": int(due),
                        "rmqdelay-published": int(due) - 600_000,
                        "rmqdelay-route-in": "work",
                        "rmqdelay-attempt": 2,
                        "tenant": "acme",
                    },
                ),
                routing_key="dest",
            )
        before = {t.id: _view(t) for t in (await source.find()).tasks}
    assert {plain.id, raw.id, foreign_id} <= set(before)

    exported = await _export(own_settings)
    lines = [json.loads(line) for line in exported.splitlines()]
    assert lines[0]["format"] == "rmqdelay-export/1"
    assert {"task", "cancel", "series"} <= {line.get("kind") for line in lines[1:]}

    items = moving.read_export(io.StringIO(exported))
    async with Scheduler(other) as target:
        first = await moving.import_items(target, items)
        again = await moving.import_items(target, items)
        after = {t.id: _view(t) for t in (await target.find()).tasks}
        series = await target.series()
    assert first.tasks == len(before)
    assert (again.tasks, again.already, again.cancels, again.series) == (0, len(before), 0, 0)
    assert after == before  # ids, keys, due times, attempts, stamps, properties, bodies
    assert [s.key for s in series] == ["heartbeat"]
    # The live cancels came along: a copy published under "gone" before it would not run.
    async with Scheduler(other) as target:
        assert (await target.cancel("gone", count=True)).pending == 0


async def test_an_imported_task_runs_once_on_the_target_however_often_it_is_imported(
    own_settings: Settings, other: Settings
) -> None:
    async with Scheduler(own_settings) as source:
        soon = await source.schedule("dest", {"n": 1}, delay=2.5)
    exported = await _export(own_settings)
    recorder = Recorder()
    async with running_worker(other, "dest", recorder) as worker, Scheduler(other) as target:
        for _ in range(3):
            await moving.import_items(target, moving.read_export(io.StringIO(exported)))
        await recorder.wait_for({soon.id}, within=15)
        # Only one copy was published, so nothing else can come: the journal says so.
        index = await target.find(key=soon.id)
        assert index.tasks == []
        assert worker.stats.executed == 1
    assert recorder.counts[soon.id] == 1


async def test_import_refuses_a_file_that_is_not_an_export_naming_the_line(
    own_settings: Settings,
) -> None:
    with pytest.raises(ConfigError, match="not an rmqdelay export"):
        moving.read_export(io.StringIO('{"kind": "task"}\n'))
    header = '{"format": "rmqdelay-export/1"}\n'
    with pytest.raises(ConfigError, match="line 2: "):
        moving.read_export(io.StringIO(header + '{"kind": "task", "id": 1}\n'))
    with pytest.raises(ConfigError, match="line 3: unknown kind 'x'"):
        moving.read_export(io.StringIO(header + "\n" + '{"kind": "x"}\n'))


async def test_import_needs_the_destinations_on_the_target_and_sends_nothing_without(
    own_settings: Settings, broker_url: str
) -> None:
    async with Scheduler(own_settings) as source:
        await source.schedule("dest", {}, delay=600)
    bare = make_settings(broker_url, max_delay=timedelta(hours=1))
    await apply_topology(bare, build_topology(bare.layout))
    try:
        items = moving.read_export(io.StringIO(await _export(own_settings)))
        async with Scheduler(bare) as target:
            with pytest.raises(ConfigError, match="no work queue for 'dest'"):
                await moving.import_items(target, items)
            assert (await target.find()).tasks == []
    finally:
        await apply_topology(bare, build_topology(bare.layout), delete=True)


async def test_transfer_moves_pending_tasks_and_a_crash_midway_is_finished_by_running_again(
    own_settings: Settings, other: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run dies after the target confirmed a batch and before the source's
    cancels: both sides hold those tasks. Running the transfer again cancels them on the
    source without publishing them again, so each runs once, on the target."""
    recorder_source, recorder_target = Recorder(), Recorder()
    real = publish_cancel

    async def crash(*args: Any) -> None:
        raise PublishNotConfirmedError("the link dropped (a crash, for the test)")

    async with (
        running_worker(own_settings, "dest", recorder_source) as source_worker,
        running_worker(other, "dest", recorder_target),
        Scheduler(own_settings) as source,
        Scheduler(other) as target,
    ):
        tasks = [await source.schedule("dest", {"i": i}, delay=6 + i * 0.01) for i in range(40)]
        soon = await source.schedule("dest", {"soon": True}, delay=1.0)  # within the margin
        monkeypatch.setattr(moving, "publish_cancel", crash)
        with pytest.raises(PublishNotConfirmedError, match="run the command again"):
            await moving.transfer(source, target, margin_s=3.0)
        monkeypatch.setattr(moving, "publish_cancel", real)
        counts = await moving.transfer(source, target, margin_s=3.0)
        assert (counts.tasks, counts.already, counts.left) == (0, 40, 1)
        await recorder_target.wait_for({t.id for t in tasks}, within=20)
        await recorder_source.wait_for({soon.id}, within=20)
        async with asyncio.timeout(20):  # the source skips every copy that moved
            await source_worker.wait_for(lambda s: s.cancelled == 40)
    assert recorder_target.counts == {t.id: 1 for t in tasks}
    assert recorder_source.counts == {soon.id: 1}
    for task, ran in recorder_target.runs:
        assert ran >= task.due_at.timestamp()  # none early


def test_the_cli_lists_shows_reschedules_exports_and_imports(
    own_settings: Settings,
    other: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    use_in_cli(monkeypatch, own_settings)
    assert main(["schedule", "dest", '{"a": 1}', "--delay", "10m", "--key", "inc:9"]) == 0
    task_id = capsys.readouterr().out.split()[1]
    assert main(["tasks", "list", "--key", "inc:9", "--json"]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["id"], listed["keys"], listed["size"]) == (task_id, ["inc:9"], 7)
    assert main(["tasks", "show", task_id]) == 0
    shown = capsys.readouterr().out
    assert 'payload: {"a": 1}' in shown
    assert main(["reschedule", "inc:9", "--delay", "20m"]) == 0
    assert "the old copy is cancelled" in capsys.readouterr().out
    assert main(["tasks", "show", "nope"]) == 1
    assert "no pending task has id 'nope'" in capsys.readouterr().err
    assert main(["cancel", "--count", "other-key"]) == 0
    assert "0 pending" in capsys.readouterr().out
    path = tmp_path / "pending.jsonl"
    assert main(["export", str(path)]) == 0
    assert "exported 1 tasks" in capsys.readouterr().err
    use_in_cli(monkeypatch, other)
    assert main(["import", str(path)]) == 0
    assert "imported 1 tasks" in capsys.readouterr().err
    assert main(["tasks", "list"]) == 0
    assert task_id in capsys.readouterr().out


async def test_an_export_says_how_many_waiting_tasks_the_journal_does_not_have(
    broker_url: str,
) -> None:
    """Tasks scheduled before the journal was on (or longer ago than its retention) wait
    in the levels unseen by it: the export counts them instead of leaving them out quietly."""
    without = make_settings(broker_url, max_delay=timedelta(hours=1), journal=False)
    with_journal = without.model_copy(update={"journal": True})
    topology = build_topology(with_journal.layout, ("dest",))
    await apply_topology(without, build_topology(without.layout, ("dest",)))
    try:
        async with Scheduler(without) as scheduler:
            for _ in range(3):
                await scheduler.schedule("dest", {}, delay=600)
        await apply_topology(with_journal, topology)  # the journal's bindings from now on
        async with Scheduler(with_journal) as scheduler:
            for _ in range(2):
                await scheduler.schedule("dest", {}, delay=600)
            counts = await moving.export(scheduler, io.StringIO())
        assert (counts.tasks, counts.uncovered) == (2, 3)
        assert "about 3 tasks waiting in the levels are not in the journal" in counts.describe(
            "exported"
        )
    finally:
        await apply_topology(with_journal, topology, delete=True)
