"""Fault tests: processes and the broker dying under load. Bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import socket
import time

import pytest

from rmqdelay import BrokerUnavailableError, Scheduler, Settings, Task
from rmqdelay.broker.management import namespace_depths
from rmqdelay.cli.main import main as cli_main

from .conftest import TestBroker, cannot, make_settings
from .helpers import (
    Recorder,
    kill_a_worker_mid_handler,
    running_worker,
    use_in_cli,
)
from .proxy import Proxy

pytestmark = pytest.mark.integration


async def test_a_worker_killed_mid_handler_leaves_the_task_to_the_next_worker(
    settings: Settings, destination: str
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"step": "charge card"}, delay=0)
    assert await kill_a_worker_mid_handler(settings, destination) == s.id
    recorder = Recorder()
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({s.id}, within=20)
    task = recorder.runs[0][0]
    assert task.redelivered
    assert task.payload == {"step": "charge card"}


@pytest.mark.timeout(300)
async def test_broker_killed_and_restarted_under_load_loses_no_confirmed_task(
    own_settings: Settings, test_broker: TestBroker, test_broker_version: tuple[int, int]
) -> None:
    """A namespace of its own: a level that stalls after the kill (RabbitMQ 3.10.8, see
    below) must not leak its tasks into a shared namespace's unroutable queue later."""
    if test_broker.control is None:
        cannot("RMQDELAY_TEST_BROKER_CONTROL is not set: this test kills the broker")
    settings, destination = own_settings, "dest"
    recorder, returned, refused = Recorder(), set[str](), 0
    rng = random.Random(3)

    async def produce(scheduler: Scheduler) -> None:
        nonlocal refused
        for i in range(400):
            try:
                s = await scheduler.schedule(destination, {"i": i}, delay=rng.uniform(0, 1))
            except BrokerUnavailableError:
                refused += 1
                continue
            returned.add(s.id)
            await asyncio.sleep(0.01)  # pacing the load

    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        later_key = f"later-{destination}"
        later = [
            await scheduler.schedule(destination, {}, delay=45 * 60, keys=[later_key])
            for _ in range(5)
        ]
        producing = asyncio.create_task(produce(scheduler))
        async with asyncio.timeout(30):
            while len(recorder.ids) < 30:  # noqa: ASYNC110 - load must be flowing first
                await asyncio.sleep(0.05)
        await asyncio.to_thread(test_broker.kill_and_restart)
        await asyncio.wait_for(producing, 120)
        try:
            await recorder.wait_for(returned, within=120)
        except TimeoutError:
            missing = len(returned - recorder.ids)
            held = await namespace_depths(settings, "level.", "work.")
            where = f"{missing} of {len(returned)} returned tasks not run; queues: {held}"
            # RabbitMQ 3.10.8: after a kill -9, a level's at-least-once dead-letter worker
            # can stall for good (seen once in CI; docs/design.md, "Node loss"). The tasks
            # are not lost, they are still in the level, which is what is checked there.
            # The 5 later tasks wait in a level too: they do not count.
            if test_broker_version >= (4, 0) or sum(held.values()) - len(later) < missing:
                raise AssertionError(where) from None
            print(f"\nRabbitMQ 3.10 level stalled after kill -9 (tolerated): {where}")
            return
        # The journal came through the kill too: the tasks still waiting are all listed.
        still = await scheduler.find(key=later_key)
        assert {t.id for t in still.tasks} == {t.id for t in later}
    duplicates = sum(n - 1 for n in recorder.counts.values())
    print(
        f"\nbroker kill -9: {len(returned)} schedules returned, {refused} refused, "
        f"{duplicates} executed twice or more"
    )
    assert returned <= recorder.ids
    assert refused == 0, "the outage was shorter than RMQDELAY_PUBLISH_DEADLINE"
    assert duplicates <= max(5, len(returned) // 20), "duplicates must be rare"


async def test_schedule_during_an_outage_retries_until_the_deadline_then_says_so(
    settings: Settings, destination: str
) -> None:
    async with Proxy(settings.url) as proxy:
        via_proxy = make_settings(
            proxy.url, namespace=settings.namespace, declare=False, publish_deadline="1500ms"
        )
        async with Scheduler(via_proxy) as scheduler:
            await scheduler.declare_destination(destination)
            await scheduler.schedule(destination, {}, delay=0)
            await proxy.down()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError, match="RMQDELAY_PUBLISH_DEADLINE") as info:
                await scheduler.schedule(destination, {}, delay=0)
            assert 1.5 <= time.monotonic() - started <= 15
            assert "guest:guest" not in str(info.value)
            await proxy.up()
            s = await scheduler.schedule(destination, {"after": "outage"}, delay=0)
    recorder = Recorder()
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({s.id}, within=10)


async def test_a_publish_on_a_link_gone_silent_is_sent_once_on_the_next_node(
    settings: Settings, destination: str
) -> None:
    """A link that goes silent (a cut network: no socket error) is given up after a few
    heartbeats. The publish that waited on it is sent again on the next node, once, and
    schedule() returns; it never raises the CancelledError aiormq ends the wait with."""
    async with Proxy(settings.url) as first, Proxy(settings.url) as second:
        listed = make_settings(
            f"{first.url},{second.url}", namespace=settings.namespace, declare=False,
            heartbeat="1s",
        )  # fmt: skip
        recorder = Recorder()
        async with Scheduler(listed) as scheduler:
            await scheduler.declare_destination(destination)
            await scheduler.schedule(destination, {"n": 0}, delay=0)
            first.stall()
            started = time.monotonic()
            s = await scheduler.schedule(destination, {"n": 1}, delay=0)
            took = time.monotonic() - started
            first.resume()  # what the silent link held reaches a connection the broker closed
            after = await scheduler.schedule(destination, {"n": 2}, delay=1)
        assert second.connections >= 1, "the scheduler moved to the second node"
        # aiormq gives a link up after (heartbeat + 1) x 3 s without a frame.
        assert 5 <= took <= 20, took
        async with running_worker(settings, destination, recorder):
            await recorder.wait_for({s.id, after.id}, within=30)
        assert recorder.counts[s.id] == 1, "sent once per link: the stalled copy was not stored"


async def test_a_task_whose_ack_was_lost_with_a_silent_link_is_not_run_again(
    settings: Settings, destination: str
) -> None:
    """The worker runs a task, and its ack goes into a link that has gone silent. The
    broker gives the link up and delivers the task again, to the same worker on its next
    node: it acks it without running it again, and counts it."""
    started, go = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def handler(task: Task) -> None:
        runs.append(task.id)
        started.set()
        await go.wait()

    async with Proxy(settings.url) as first, Proxy(settings.url) as second:
        listed = make_settings(
            f"{first.url},{second.url}", namespace=settings.namespace, declare=False,
            heartbeat="1s",
        )  # fmt: skip
        async with Scheduler(settings) as scheduler:
            await scheduler.declare_destination(destination)
            s = await scheduler.schedule(destination, {}, delay=0)
        async with running_worker(listed, destination, handler) as worker:
            await asyncio.wait_for(started.wait(), 20)
            first.stall()  # the ack the handler's return sends goes nowhere
            go.set()
            stats = await asyncio.wait_for(worker.wait_for(lambda st: st.repeated >= 1), 60)
            assert second.connections >= 1, "the worker moved to the second node"
    assert runs == [s.id], "ran once, though delivered twice"
    assert stats.executed == 1


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_every_client_skips_a_dead_node_of_a_url_list(
    settings: Settings, destination: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"amqp://guest:s3cret-dead@127.0.0.1:{_closed_port()}/%2F"
    listed = make_settings(f"{dead},{settings.url}", namespace=settings.namespace, declare=False)
    assert listed.urls == (dead, settings.url)
    assert "s3cret-dead" not in repr(listed)
    assert "s3cret-dead" not in listed.safe_url
    recorder = Recorder()
    async with Scheduler(listed) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"via": "second node"}, delay=0.3)
    async with running_worker(listed, destination, recorder):
        await recorder.wait_for({s.id}, within=20)
    use_in_cli(monkeypatch, listed)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await asyncio.to_thread(cli_main, ["status", "--json"]) == 0
    assert destination in out.getvalue()
    assert "s3cret-dead" not in out.getvalue()


async def test_a_dropped_node_fails_over_to_the_next_and_work_resumes(
    settings: Settings, destination: str
) -> None:
    async with Proxy(settings.url) as first, Proxy(settings.url) as second:
        listed = make_settings(
            f"{first.url},{second.url}", namespace=settings.namespace, declare=False
        )
        recorder = Recorder()
        async with Scheduler(listed) as scheduler:
            await scheduler.declare_destination(destination)
        async with Scheduler(listed) as scheduler, running_worker(listed, destination, recorder):
            before = await scheduler.schedule(destination, {"n": 1}, delay=0)
            await recorder.wait_for({before.id}, within=20)
            assert first.connections > 0
            assert second.connections == 0
            await first.down()  # the node dies for good: only the second one is left
            after = [await scheduler.schedule(destination, {"n": n}, delay=0.5) for n in range(5)]
            await recorder.wait_for({s.id for s in after}, within=60)
        assert second.connections >= 2, "both the scheduler and the worker moved over"
