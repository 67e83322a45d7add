"""The worker's holder: deliveries not due yet, released in due order, never early."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from rmqdelay.worker.delivery import Delivery
from rmqdelay.worker.hold import Holder
from rmqdelay.worker.metrics import WorkerMetrics
from rmqdelay.worker.stats import Tally


class _Channel:
    is_closed = False


class _Held:
    """As much of a Delivery as the holder reads."""

    def __init__(self, name: str, channel: _Channel | None = None) -> None:
        self.name = name
        self.headers: dict[str, Any] = {"rmqdelay-id": name}
        self.message_id = name
        self.channel = channel or _Channel()


def _holder(released: list[tuple[str, float]]) -> Holder:
    metrics = WorkerMetrics("hold-test")
    return Holder(
        Tally(metrics), metrics, lambda m: released.append((cast(Any, m).name, time.time()))
    )


async def _until(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling a plain list under a bound
            await asyncio.sleep(0.005)


async def test_releases_in_due_order_and_never_early() -> None:
    released: list[tuple[str, float]] = []
    holder = _holder(released)
    now = time.time()
    dues = {"c": now + 0.15, "a": now + 0.05, "b": now + 0.10, "a2": now + 0.05}
    for name, due in dues.items():
        holder.hold(cast(Delivery, _Held(name)), due)
    assert len(holder) == 4
    await _until(lambda: len(released) == 4)
    assert [name for name, _ in released] == ["a", "a2", "b", "c"]  # equal dues: arrival order
    assert all(at >= dues[name] for name, at in released)
    assert len(holder) == 0


async def test_an_earlier_task_rearms_the_timer() -> None:
    released: list[tuple[str, float]] = []
    holder = _holder(released)
    now = time.time()
    holder.hold(cast(Delivery, _Held("late")), now + 30)
    holder.hold(cast(Delivery, _Held("soon")), now + 0.02)
    await _until(lambda: released)
    assert [name for name, _ in released] == ["soon"]
    assert len(holder) == 1
    holder.take_all()


async def test_a_task_whose_channel_closed_is_dropped() -> None:
    released: list[tuple[str, float]] = []
    holder = _holder(released)
    closed = _Channel()
    now = time.time()
    holder.hold(cast(Delivery, _Held("gone", closed)), now + 0.02)
    holder.hold(cast(Delivery, _Held("kept")), now + 0.04)
    closed.is_closed = True
    await _until(lambda: released)
    await asyncio.sleep(0.05)
    assert [name for name, _ in released] == ["kept"]


async def test_take_all_stops_the_timer_and_skips_closed_channels() -> None:
    released: list[tuple[str, float]] = []
    holder = _holder(released)
    closed = _Channel()
    closed.is_closed = True
    now = time.time()
    for name, channel in (("b", None), ("gone", closed), ("a", None)):
        holder.hold(cast(Delivery, _Held(name, channel)), now + (0.05 if name == "a" else 0.06))
    taken = holder.take_all()
    assert [cast(Any, m).name for m in taken] == ["a", "b"]
    assert len(holder) == 0
    await asyncio.sleep(0.1)
    assert released == []


@pytest.mark.parametrize("count", [1, 500])
async def test_a_due_time_in_the_past_is_released_at_once(count: int) -> None:
    released: list[tuple[str, float]] = []
    holder = _holder(released)
    for i in range(count):
        holder.hold(cast(Delivery, _Held(str(i))), time.time() - 1)
    await _until(lambda: len(released) == count)
