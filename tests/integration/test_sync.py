"""SyncScheduler: the blocking client, from many threads, on one connection."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from rmqdelay import (
    BrokerUnavailableError,
    InvalidDelayError,
    InvalidPayloadError,
    Settings,
    SyncScheduler,
    TaskSpec,
    UnroutableError,
)
from tests.integration.helpers import Recorder, running_worker

pytestmark = pytest.mark.integration


async def test_threads_share_one_connection_and_every_task_runs(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    with SyncScheduler(settings) as client:
        await asyncio.to_thread(client.declare_destination, destination)
        connections: set[int] = set()
        lock = threading.Lock()

        def schedule(i: int) -> str:
            scheduled = client.schedule(destination, {"i": i}, delay=0.3)
            with lock:
                connections.add(id(client._scheduler.connection))  # type: ignore[union-attr]
            return scheduled.id

        def run_all() -> list[str]:
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(schedule, range(40)))

        ids = await asyncio.to_thread(run_all)
        batch = await asyncio.to_thread(
            client.schedule_many, [TaskSpec(destination, {"b": n}, delay=0.2) for n in range(5)]
        )
        async with running_worker(settings, destination, recorder):
            await recorder.wait_for({*ids, *(t.id for t in batch)}, within=30)
    assert len(connections) == 1, "every thread's call went over the one connection"
    assert len(set(ids)) == 40


async def test_cancel_from_a_thread_calls_the_task_off(
    settings: Settings, destination: str
) -> None:
    recorder = Recorder()
    with SyncScheduler(settings) as client:
        await asyncio.to_thread(client.declare_destination, destination)
        doomed = await asyncio.to_thread(
            client.schedule, destination, "doomed", delay=0.5, keys=["k1"]
        )
        await asyncio.to_thread(client.cancel, "k1", until=timedelta(minutes=1))
        kept = await asyncio.to_thread(client.schedule, destination, "kept", delay=0.6)
        async with running_worker(settings, destination, recorder) as worker:
            await recorder.wait_for({kept.id}, within=30)
            await worker.wait_for(lambda s: s.cancelled >= 1)
    assert doomed.id not in recorder.ids


async def test_errors_are_the_async_clients_raised_in_the_calling_thread(
    settings: Settings, destination: str
) -> None:
    with SyncScheduler(settings) as client:
        with pytest.raises(InvalidPayloadError, match="JSON"):
            await asyncio.to_thread(client.schedule, destination, {1, 2}, delay=0)
        with pytest.raises(InvalidDelayError, match="-5"):
            await asyncio.to_thread(client.schedule, destination, "x", delay=-5)
        with pytest.raises(UnroutableError, match=destination):
            await asyncio.to_thread(client.schedule, destination, "no queue yet", delay=0)
        # A failed call leaves the client usable.
        await asyncio.to_thread(client.declare_destination, destination)
        scheduled = await asyncio.to_thread(client.schedule, destination, "ok", delay=0)
    assert scheduled.destination == destination


def test_nothing_connects_before_the_first_call() -> None:
    unreachable = Settings(
        _env_file=None,
        url="amqp://user:s3cret@127.0.0.1:1/%2F",
        connect_timeout=timedelta(seconds=1),
    )
    before = set(threading.enumerate())  # other clients' threads (an earlier test's) aside
    client = SyncScheduler(unreachable)  # a module-level client costs nothing until used
    with pytest.raises(BrokerUnavailableError) as caught:
        client.schedule("anywhere", "x", delay=0)
    assert "s3cret" not in str(caught.value)
    client.close()  # closing a client that never connected is fine
    left = [t for t in threading.enumerate() if t not in before and t.name == "rmqdelay-sync"]
    assert not left, "a failed start leaves no loop thread behind"


def _in_child(client: SyncScheduler, destination: str, results: multiprocessing.Queue[str]) -> None:
    results.put(client.schedule(destination, "from the child", delay=0).id)
    client.close()


async def test_a_forked_child_connects_on_its_own(settings: Settings, destination: str) -> None:
    """A pre-forking server (gunicorn --preload) may create and even use the client before
    it forks: the child must not wait on the parent's loop thread, which it lacks."""
    recorder = Recorder()
    client = SyncScheduler(settings)
    try:
        await asyncio.to_thread(client.declare_destination, destination)  # parent connects
        context = multiprocessing.get_context("fork")
        results: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=_in_child, args=(client, destination, results))
        child.start()
        child_id = await asyncio.to_thread(results.get, timeout=60)
        await asyncio.to_thread(child.join, 30)
        assert child.exitcode == 0
        parent = await asyncio.to_thread(client.schedule, destination, "from the parent", delay=0)
        async with running_worker(settings, destination, recorder):
            await recorder.wait_for({child_id, parent.id}, within=30)
    finally:
        client.close()


async def test_recurring_series_from_a_thread(settings: Settings, destination: str) -> None:
    recorder = Recorder()
    key = f"sync-{destination}"
    with SyncScheduler(settings) as client:
        await asyncio.to_thread(client.declare_destination, destination)
        series = await asyncio.to_thread(client.recurring, destination, "tick", every=1, key=key)
        assert series.key == key
        listed = await asyncio.to_thread(client.series)
        assert key in {s.key for s in listed}
        async with running_worker(settings, destination, recorder) as worker:
            await worker.wait_for(lambda s: s.executed >= 2)
            await asyncio.to_thread(client.remove_series, key)
        assert key not in {s.key for s in await asyncio.to_thread(client.series)}
