"""Network partitions on the cluster: each node in a network namespace of its own, the
clients (scheduler and worker) on this host, the network cut with ``scripts/cluster cut``,
``cut-clients`` and ``heal``. Under load below 200 tasks/s, each scenario must end with
every task whose schedule() returned executed, none early, duplicates counted and bounded,
and the scheduler and worker working again without anyone restarting them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from rmqdelay import Scheduler
from rmqdelay.broker.management import namespace_depths
from tests.integration.helpers import Recorder, eventually, running_worker

from .conftest import Cluster
from .load import (
    DESTINATION,
    Load,
    all_members_online,
    cluster_settings,
    eventually_async,
    level_leaders,
    missing,
    namespace,
    report,
)

pytestmark = [pytest.mark.cluster, pytest.mark.partition]

#: Tasks per second: under the 200/s the issue names for partitions.
RATE = 150
#: How long the cut of scenarios (a) and (b) lasts.
CUT_S = 30.0


@dataclass
class Timeline:
    """When the fault began and ended, and what the handler saw around it (wall clock)."""

    cut_at: float
    healed_at: float
    load: Load
    recorder: Recorder

    def ran_at(self) -> dict[str, float]:
        first: dict[str, float] = {}
        for task, ran in self.recorder.runs:
            first.setdefault(task.id, ran)
        return first

    def longest_silence(self) -> float:
        """The longest stretch after the cut in which the handler ran nothing."""
        times = sorted(t for _, t in self.recorder.runs if t >= self.cut_at)
        edges = [self.cut_at, *times]
        return max((b - a for a, b in itertools.pairwise(edges)), default=0.0)

    def first_run_of_a_task_scheduled_after(self, since: float) -> float | None:
        """Seconds from ``since`` until a task whose schedule() began after it first ran."""
        ran = self.ran_at()
        after = [ran[i] for i, called in self.load.called_at.items() if called > since and i in ran]
        return min(after) - since if after else None

    def summary(self) -> str:
        resumed = self.first_run_of_a_task_scheduled_after(self.healed_at)
        during = self.first_run_of_a_task_scheduled_after(self.cut_at)
        return (
            f"fault {self.healed_at - self.cut_at:.1f} s; longest silence of the handler "
            f"{self.longest_silence():.1f} s; a task scheduled after the cut first ran "
            f"{during:.1f} s after it; one scheduled after the heal {resumed:.1f} s after it"
            if resumed is not None and during is not None
            else f"no task scheduled after the fault ran: resumed={resumed}, during={during}"
        )


async def _partitioned(
    cluster: Cluster,
    victim: int,
    fault: Callable[[], Awaitable[None]],
    what: str,
    *,
    fleet: bool = False,
) -> Timeline:
    """Load on, the scheduler and a worker connected to node ``victim`` (it comes first in
    their URLs; with ``fleet``, a second worker on the next node); once tasks flow,
    ``fault`` (which cuts and heals); the load stays on until a task scheduled after the
    heal has run, then every returned task must run."""
    settings = cluster_settings(cluster, victim)
    other = cluster_settings(cluster, victim % len(cluster.urls) + 1, namespace=settings.namespace)
    async with namespace(settings):
        recorder = Recorder()
        async with (
            Scheduler(settings) as scheduler,
            running_worker(settings, DESTINATION, recorder),
            running_worker(other, DESTINATION, recorder) if fleet else contextlib.nullcontext(),
        ):
            load, stop = Load(scheduler, rate=RATE), asyncio.Event()
            loading = asyncio.create_task(load.run(stop))
            await eventually(lambda: len(recorder.ids) >= RATE, 60, "tasks flowing before the cut")
            cut_at = time.time()
            try:
                await fault()
            finally:
                await asyncio.to_thread(cluster.run, "heal")
            timeline = Timeline(cut_at, time.time(), load, recorder)
            # Resumed on their own: a task scheduled after the heal was executed.
            await eventually(
                lambda: (
                    timeline.first_run_of_a_task_scheduled_after(timeline.healed_at) is not None
                ),
                120,
                "a task scheduled after the heal to run",
            )
            stop.set()
            await asyncio.wait_for(loading, 180)
            try:
                await recorder.wait_for(load.returned, within=180)
            except TimeoutError:
                depths = await namespace_depths(settings)
                raise AssertionError(missing(load, recorder, depths)) from None
        report(what, load, recorder)
        print(f"{what}: {timeline.summary()}")
        # The next scenario starts from a whole cluster.
        await eventually_async(lambda: all_members_online(settings), 180, "members back")
    return timeline


async def _busiest(cluster: Cluster) -> int:
    """The node that leads most delay levels of a fresh namespace."""
    probe = cluster_settings(cluster, 1)
    async with namespace(probe):
        node = (await level_leaders(probe)).most_common(1)[0][0]
    return int(node.split("@")[0][-1])  # rmqd<version>c<N>@address


@pytest.mark.timeout(600)
async def test_a_node_cut_off_from_the_others_and_the_clients_loses_no_task(
    cluster: Cluster,
) -> None:
    victim = await _busiest(cluster)

    async def cut() -> None:
        await asyncio.to_thread(cluster.run, "cut", str(victim))
        await asyncio.sleep(CUT_S)  # the fault's length, not a wait for an event

    await _partitioned(cluster, victim, cut, f"node {victim} cut off for {CUT_S:g} s")


@pytest.mark.timeout(600)
async def test_clients_cut_off_from_their_node_move_to_another(cluster: Cluster) -> None:
    """With a second worker on another node: what the cut worker ran before the broker
    gave its link up (about two heartbeats) may run again there (its acks were lost)."""
    victim = 2

    async def cut_clients() -> None:
        await asyncio.to_thread(cluster.run, "cut-clients", str(victim))
        await asyncio.sleep(CUT_S)

    timeline = await _partitioned(
        cluster,
        victim,
        cut_clients,
        f"clients cut off from node {victim} for {CUT_S:g} s, two workers",
        fleet=True,
    )
    # The other nodes stayed reachable: the clients moved to one of them during the cut.
    ran = timeline.ran_at()
    moved = [
        i
        for i, called in timeline.load.called_at.items()
        if timeline.cut_at < called and ran.get(i, float("inf")) < timeline.healed_at
    ]
    assert moved, "no task scheduled during the cut ran before the heal: the clients did not move"


@pytest.mark.timeout(600)
async def test_a_flapping_node_loses_no_task(cluster: Cluster) -> None:
    victim = await _busiest(cluster)

    async def flap() -> None:
        until = time.monotonic() + 60
        while time.monotonic() < until:
            await asyncio.to_thread(cluster.run, "cut", str(victim))
            await asyncio.sleep(3)  # the fault's rhythm: 3 s cut, 3 s whole
            await asyncio.to_thread(cluster.run, "heal", str(victim))
            await asyncio.sleep(3)

    await _partitioned(cluster, victim, flap, f"node {victim} flapping for 60 s")
