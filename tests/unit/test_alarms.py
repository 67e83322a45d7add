"""Resource alarms as a connection hears of them, and as ``rmqdelay status`` shows them;
without a broker (tests/integration/test_alarms.py raises real ones)."""

from __future__ import annotations

import asyncio

import aiormq
from pamqp.commands import Connection

from rmqdelay.broker import alarms
from rmqdelay.tools.status import alarms_raised


def test_aiormq_still_has_the_handlers_alarms_rely_on() -> None:
    # watch() wraps these (name-mangled) methods of aiormq's connection; an aiormq that
    # renamed them would leave blocked publishes unnamed, failing as unconfirmed ones.
    assert callable(getattr(aiormq.Connection, alarms._ON_BLOCKED))
    assert callable(getattr(aiormq.Connection, alarms._ON_UNBLOCKED))


class FakeConnection:
    """Stands for aiormq's connection: the two handlers its reader calls, by those names."""

    def __init__(self) -> None:
        self.frames: list[object] = []

    async def _Connection__handle_connection_blocked(self, frame: object) -> None:
        self.frames.append(frame)

    async def _Connection__handle_connection_unblocked(self, frame: object) -> None:
        self.frames.append(frame)


async def test_a_blocked_frame_is_recorded_waited_on_and_cleared() -> None:
    connection = FakeConnection()
    assert alarms.watch(connection)
    assert alarms.watch(connection)  # a second call changes nothing
    assert alarms.alarm_of(connection) is None
    assert await alarms.cleared(connection, 0)

    blocked = Connection.Blocked(reason="low on disk")
    await getattr(connection, alarms._ON_BLOCKED)(blocked)
    alarm = alarms.alarm_of(connection)
    assert alarm is not None
    assert alarm.reason == "low on disk"
    assert "'low on disk'" in alarm.describe()
    assert "free disk space" in alarm.describe()
    assert not await alarms.cleared(connection, 0.01)

    waiting = asyncio.create_task(alarms.cleared(connection, 5))
    await asyncio.sleep(0)
    assert not waiting.done()
    await getattr(connection, alarms._ON_UNBLOCKED)(Connection.Unblocked())
    assert await waiting
    assert alarms.alarm_of(connection) is None
    assert connection.frames[0] is blocked  # aiormq's own handlers still run


async def test_an_unknown_reason_is_kept_as_given() -> None:
    connection = FakeConnection()
    alarms.watch(connection)
    await getattr(connection, alarms._ON_BLOCKED)(Connection.Blocked(reason="low on memory"))
    alarm = alarms.alarm_of(connection)
    assert alarm is not None
    assert "vm_memory_high_watermark" in alarm.describe()
    await getattr(connection, alarms._ON_BLOCKED)(Connection.Blocked(reason="something new"))
    alarm = alarms.alarm_of(connection)
    assert alarm is not None
    assert "'something new'" in alarm.describe()
    assert "broker's log" in alarm.describe()


def test_without_the_handlers_nothing_is_watched() -> None:
    class Bare:
        pass

    bare = Bare()
    assert not alarms.watch(bare)
    assert alarms.alarm_of(bare) is None


def test_status_names_each_alarm_with_its_figures() -> None:
    nodes = [
        {"name": "rabbit@a", "disk_free_alarm": True, "disk_free": 40_000_000,
         "disk_free_limit": 50_000_000, "mem_alarm": False},
        {"name": "rabbit@b", "mem_alarm": True, "mem_used": 2_100_000_000,
         "mem_limit": 2_000_000_000, "disk_free_alarm": False},
        {"name": "rabbit@c", "mem_alarm": False, "disk_free_alarm": False},
        {"name": "rabbit@d"},  # a node the management API could not sample
    ]  # fmt: skip
    raised = alarms_raised(nodes)
    assert [alarm for alarm, _ in raised] == ["rabbit@a: disk", "rabbit@b: memory"]
    disk, memory = (text for _, text in raised)
    assert "DISK ALARM, 40 MB free, under its disk_free_limit of 50 MB" in disk
    assert "MEMORY ALARM, 2.1 GB in use, over its high watermark of 2 GB" in memory
    assert "blocks every publisher" in memory
    assert alarms_raised([{"name": "x", "disk_free_alarm": True}])[0][1].count("?") == 2
