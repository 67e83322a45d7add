"""A dead node loses nothing: kill -9 and rolling restarts of a three-node cluster under
load. Bounded in time; each test uses a namespace of its own and deletes it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rmqdelay import (
    BrokerUnavailableError,
    JournalUnavailableError,
    Scheduler,
    Settings,
    TaskSpec,
)
from rmqdelay.broker.management import management_get, namespace_depths, vhost_path
from tests.integration.helpers import Recorder, eventually, running_worker

from .conftest import NODES, Cluster
from .load import (
    DESTINATION,
    RATE,
    Load,
    all_members_online,
    cluster_settings,
    eventually_async,
    level_leaders,
    missing,
    namespace,
    report,
)

pytestmark = pytest.mark.cluster


async def _broker_version(settings: Settings) -> tuple[int, int]:
    overview = await management_get(settings, "overview")
    assert overview is not None, "no management API answered"
    major, minor, *_ = str(overview["rabbitmq_version"]).split(".")
    return int(major), int(minor)


async def _under_load(
    settings: Settings,
    fault: Callable[[], Awaitable[None]],
    what: str,
    recover: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Schedule and execute at RATE/s; once tasks flow, apply ``fault``; keep the load on
    for 3 s more, then wait for every task whose schedule() returned. ``recover`` (the
    dead node's restart) runs after that.

    On RabbitMQ 4.x every returned task must run before ``recover`` and no publish may be
    refused. On 3.10 tasks still missing then must run after it (a level can stall until
    the dead node is back: see docs/how-to/cluster.md)."""
    strict = await _broker_version(settings) >= (4, 0)
    recorder = Recorder()
    async with Scheduler(settings) as scheduler, running_worker(settings, DESTINATION, recorder):
        load, stop = Load(scheduler), asyncio.Event()
        loading = asyncio.create_task(load.run(stop))
        await eventually(lambda: len(recorder.ids) >= RATE, 60, "tasks flowing before the fault")
        await fault()
        await asyncio.sleep(3)  # load after the fault too: the clients have moved over
        stop.set()
        await asyncio.wait_for(loading, 180)
        assert len(load.returned) >= 3 * RATE
        try:
            await recorder.wait_for(load.returned, within=60 if recover else 180)
        except TimeoutError:
            if recover is None or strict:
                depths = await namespace_depths(settings)
                raise AssertionError(missing(load, recorder, depths)) from None
            # RabbitMQ 3.10.8: a level whose at-least-once dead-letter worker was sending
            # into a queue led by the dead node can stall until that node is back.
            stalled = missing(load, recorder, await namespace_depths(settings))
            print(f"\nbefore the node is back: {stalled}")
        if recover is not None:
            await recover()
            await recorder.wait_for(load.returned, within=180)
    report(what, load, recorder)
    if strict:
        assert load.refused == 0, f"publishes refused: {dict(load.reasons.most_common(3))}"


@pytest.mark.timeout(600)
async def test_killing_the_node_that_leads_most_levels_loses_no_task(cluster: Cluster) -> None:
    probe = cluster_settings(cluster, 1)
    async with namespace(probe):
        leaders = await level_leaders(probe)
        victim_node = leaders.most_common(1)[0][0]
        victim = int(victim_node.split("@")[0][-1])  # rmqd<version>c<N>@host
        print(f"\nlevel leaders: {dict(leaders)}; killing node {victim}")
        # Clients list the victim first: the worker and scheduler are connected to it.
        settings = cluster_settings(cluster, victim, namespace=probe.namespace)

        async def kill() -> None:
            await asyncio.to_thread(cluster.run, "kill", str(victim))

        async def restart() -> None:
            await asyncio.to_thread(cluster.run, "restart", str(victim))

        try:
            await _under_load(settings, kill, f"kill -9 node {victim}", restart)
        finally:  # back even when the test fails: the next test needs three nodes
            await restart()
        assert cluster.running() == NODES, "the node rejoined the cluster"
        await eventually_async(lambda: all_members_online(settings), 120, "members back")


@pytest.mark.timeout(900)
async def test_a_rolling_restart_under_load_loses_no_task(cluster: Cluster) -> None:
    settings = cluster_settings(cluster, 2)
    async with namespace(settings):

        async def roll() -> None:
            for n in range(1, NODES + 1):
                # As an operator would: stop a node only when no queue needs it for its
                # quorum (a member just back may still be catching up).
                await eventually_async(lambda n=n: cluster.safe_to_stop(n), 120, "quorum")
                await asyncio.to_thread(cluster.run, "stop", str(n))
                await asyncio.to_thread(cluster.run, "restart", str(n))
                # The next node may go only once every queue has its members back.
                await eventually_async(lambda: all_members_online(settings), 120, "members back")

        await _under_load(settings, roll, "rolling restart")
        assert cluster.running() == NODES


@pytest.mark.timeout(300)
async def test_lookups_survive_killing_the_node_that_leads_the_journal(cluster: Cluster) -> None:
    """The journal is a replicated stream: with its leader dead, another node reads it
    out whole, and a reschedule made meanwhile holds."""
    probe = cluster_settings(cluster, 1)
    async with namespace(probe):
        leader = await _journal_leader(probe)
        victim = int(leader.split("@")[0][-1])  # rmqd<version>c<N>@host
        survivor = victim % NODES + 1
        settings = cluster_settings(cluster, survivor, namespace=probe.namespace)
        async with Scheduler(settings) as scheduler:
            tasks = await scheduler.schedule_many(
                [TaskSpec(DESTINATION, {"i": i}, delay=600 + i) for i in range(200)]
            )
            print(f"\njournal leader: node {victim}; killing it, reading through {survivor}")
            await asyncio.to_thread(cluster.run, "kill", str(victim))
            try:
                found = await _eventually_found(scheduler, {t.id for t in tasks})
                assert [t.id for t in found] == [t.id for t in tasks]  # due order
                moved = await scheduler.reschedule(tasks[0].id, delay=1200)
                again = await scheduler.get(tasks[0].id)
                assert again is not None
                assert abs((again.due_at - moved.due_at).total_seconds()) < 0.001
            finally:
                await asyncio.to_thread(cluster.run, "restart", str(victim))
        await eventually_async(lambda: all_members_online(settings), 120, "members back")


async def _journal_leader(settings: Settings) -> str:
    """The node leading the journal stream, once the management API reports it (3.10 names
    a new stream's leader only with its first statistics, some seconds after the declare;
    its ``node`` is the leader's node too)."""
    deadline = time.monotonic() + 60
    while True:
        queues = await management_get(
            settings, f"queues/{vhost_path(settings)}", "name,leader,node"
        )
        for q in queues or []:
            if q["name"] == settings.names.journal and (q.get("leader") or q.get("node")):
                return str(q.get("leader") or q["node"])
        if time.monotonic() > deadline:
            raise AssertionError("the management API named no leader of the journal in 60 s")
        await asyncio.sleep(0.5)  # statistics come every few seconds


async def _eventually_found(scheduler: Scheduler, ids: set[str]) -> list[Any]:
    """Every pending task, once the stream has a new leader (a read may fail until then)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            found = []
            cursor = None
            while True:
                page = await scheduler.find(limit=1000, cursor=cursor)
                found += page.tasks
                if (cursor := page.cursor) is None:
                    break
            if {t.id for t in found} >= ids:
                return [t for t in found if t.id in ids]
        except (BrokerUnavailableError, JournalUnavailableError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the journal was not readable within 60 s of the node loss")
        await asyncio.sleep(1)  # a new stream leader is elected within seconds
