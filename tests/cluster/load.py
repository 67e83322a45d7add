"""What the cluster fault tests share: settings for a namespace of its own on the cluster,
a steady load of schedule() calls, and the count of what returned, ran, ran twice or early."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from rmqdelay import BrokerUnavailableError, PublishNotConfirmedError, Scheduler, Settings
from rmqdelay.broker.declare import apply_topology
from rmqdelay.broker.management import management_get, vhost_path
from rmqdelay.core.topology import build_topology
from tests.integration.helpers import Recorder

from .conftest import NODES, Cluster

#: Tasks per second while nodes die: at least the 200/s the issue asks for.
RATE = 200
DESTINATION = "jobs"


def cluster_settings(cluster: Cluster, first: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": cluster.url_list(first),
        "management_url": cluster.management(first),
        "namespace": f"rmqdelay-cluster-{uuid.uuid4().hex[:8]}",
        "resolution_ms": 256,
        "max_delay": timedelta(hours=1),
        "concurrency": 32,
        "prefetch": 512,
        "connect_timeout": timedelta(seconds=60),
        "publish_deadline": timedelta(seconds=60),
        "shutdown_grace": timedelta(seconds=5),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@dataclass
class Load:
    """Schedules at ``rate`` per second, each task 0.5-3 s ahead, and counts what returned
    (with when each of those schedule() calls began, on the wall clock)."""

    scheduler: Scheduler
    rate: int = RATE
    returned: set[str] = field(default_factory=set)
    called_at: dict[str, float] = field(default_factory=dict)
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    #: schedule() raised something it does not document.
    unexpected: Counter[str] = field(default_factory=Counter)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def _one(self, i: int, delay: float) -> None:
        called = time.time()
        try:
            s = await self.scheduler.schedule(DESTINATION, {"i": i}, delay=delay)
        except (BrokerUnavailableError, PublishNotConfirmedError) as e:
            self.refused += 1  # the caller was told: not a loss
            text = str(e)  # grouped by its start and its end, where the cause is named
            self.reasons[text if len(text) < 240 else f"{text[:100]} ... {text[-140:]}"] += 1
            return
        except (Exception, asyncio.CancelledError) as e:  # undocumented: failed on below
            self.unexpected[f"{type(e).__name__}: {e}"[:300]] += 1
            return
        self.returned.add(s.id)
        self.called_at[s.id] = called

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; then wait for the schedule() calls under way."""
        rng, started, i = random.Random(11), time.monotonic(), 0
        while not stop.is_set():
            elapsed = time.monotonic() - started
            # Paced by the clock, not by confirms: a stalled publish must not lower the rate.
            for _ in range(int(elapsed * self.rate) - i):
                task = asyncio.create_task(self._one(i, rng.uniform(0.5, 3.0)))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                i += 1
            await asyncio.sleep(0.005)
        if self._pending:
            await asyncio.wait(self._pending, timeout=120)
        assert not self._pending, f"{len(self._pending)} schedule() calls still hanging"


async def level_leaders(settings: Settings) -> Counter[str]:
    """How many delay levels each node leads."""
    queues = await management_get(settings, f"queues/{vhost_path(settings)}", "name,leader")
    assert queues is not None, "no management API answered"
    prefix = f"{settings.namespace}.level."
    return Counter(q["leader"] for q in queues if q["name"].startswith(prefix) and q.get("leader"))


async def all_members_online(settings: Settings) -> bool:
    """Whether every quorum queue of the namespace has all its members online."""
    queues = await management_get(settings, f"queues/{vhost_path(settings)}", "name,members,online")
    mine = [q for q in queues or [] if q["name"].startswith(f"{settings.namespace}.")]
    return bool(mine) and all(
        len(q.get("online", [])) == len(q.get("members", [])) == NODES
        for q in mine
        if "members" in q
    )


@asynccontextmanager
async def namespace(settings: Settings) -> AsyncIterator[None]:
    topology = build_topology(settings.layout, (DESTINATION,))
    await apply_topology(settings, topology)
    try:
        yield
    finally:
        if not os.environ.get("RMQDELAY_TEST_KEEP"):
            await apply_topology(settings, topology, delete=True)


def report(what: str, load: Load, recorder: Recorder) -> int:
    duplicates = sum(n - 1 for n in recorder.counts.values())
    early = [ms for ms in recorder.lateness_ms().values() if ms < 0]
    print(
        f"\n{what}: {len(load.returned)} schedules returned, {load.refused} refused, "
        f"{len(recorder.ids)} executed, {duplicates} executed twice or more "
        f"({dict(repeats(recorder))}), {len(early)} early; "
        f"refusals: {dict(load.reasons.most_common(3))}"
    )
    assert not load.unexpected, f"schedule() raised: {dict(load.unexpected.most_common(3))}"
    assert load.returned <= recorder.ids, "every task whose schedule() returned ran"
    assert not early, f"tasks ran before they were due: {sorted(early)[:5]} ms"
    assert duplicates <= max(20, len(load.returned) // 20), "duplicates must stay rare"
    return duplicates


def repeats(recorder: Recorder) -> Counter[str]:
    """The runs after a task's first, by kind: the same message given again (its ack was
    lost) or another copy (a publish or a dead-letter hop sent twice)."""
    seen: set[str] = set()
    kinds: Counter[str] = Counter()
    for task, _ in recorder.runs:
        if task.id in seen:
            kinds["redelivered" if task.redelivered else "another copy"] += 1
        seen.add(task.id)
    return kinds


def missing(load: Load, recorder: Recorder, depths: dict[str, int]) -> str:
    missing = load.returned - recorder.ids
    return f"{len(missing)} of {len(load.returned)} returned tasks not run yet; in {depths}"


async def eventually_async(
    condition: Callable[[], Awaitable[bool]], within: float, what: str
) -> None:
    """Poll an async ``condition`` (the management API) until true."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110 - polling the management API
                await asyncio.sleep(0.5)
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what}") from None
