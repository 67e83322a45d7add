"""A worker's stop of handlers near the broker's consumer timeout (``Execution.enforce``),
without a broker: tests/integration/test_consumer_timeout.py runs it against one."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from rmqdelay.core.cancelset import CancelSet
from rmqdelay.worker.execute import Execution, settle_margin_s
from rmqdelay.worker.metrics import WorkerMetrics
from rmqdelay.worker.threads import DaemonThreadPool


class Arrived:
    """What enforce() reads of a delivery."""

    def __init__(self, ago_s: float) -> None:
        self.arrived = time.monotonic() - ago_s
        self.stopped = False
        self.overran = False


def _execution() -> Execution:
    async def handler(_: Any) -> None:
        pass

    return Execution(
        handler,
        accept={"application/json"},
        timeout=None,
        consumer_timeout=timedelta(seconds=100),
        cancels=CancelSet(retention_ms=60_000),
        threads=DaemonThreadPool(1),
        metrics=WorkerMetrics("enforce-test"),
    )


def test_the_margin_is_a_tenth_and_at_most_a_minute() -> None:
    assert settle_margin_s(4) == 0.4
    assert settle_margin_s(1800) == 60


async def test_every_handler_past_its_stop_is_stopped_whatever_the_order_it_started_in() -> None:
    execution = _execution()
    assert execution.stop_after_s == 90
    sleeping = [asyncio.create_task(asyncio.sleep(60)) for _ in range(4)]
    # Started in this order: a young one first, then one that waited for a slot (older),
    # one past the timeout itself, and one well within it.
    young, waited, overdue, fresh = Arrived(50), Arrived(95), Arrived(101), Arrived(1)
    for delivery, task in zip((young, waited, overdue, fresh), sleeping, strict=True):
        execution._executing[delivery] = (f"t{id(delivery)}", task)  # type: ignore[index]
    overran = execution.enforce()
    await asyncio.sleep(0)
    assert [d.stopped for d in (young, waited, overdue, fresh)] == [False, True, True, False]
    assert [t.cancelled() for t in sleeping] == [False, True, True, False]
    assert overran == [f"t{id(overdue)}"]  # said once...
    assert execution.enforce() == []  # ...and not again
    for task in sleeping:
        task.cancel()
