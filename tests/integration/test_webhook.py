"""`consume --webhook`: tasks POSTed as JSON; failures go through the retry path."""

from __future__ import annotations

import asyncio

import pytest

from rmqdelay import RetryPolicy, Scheduler, Settings, WebhookHandler

from .helpers import running_worker
from .webhook_target import WebhookTarget

pytestmark = pytest.mark.integration
QUICK = RetryPolicy(max_attempts=10, base_ms=100, cap_ms=300)


async def test_webhook_target_down_then_up_gets_the_task_after_retries(
    settings: Settings, destination: str
) -> None:
    target = WebhookTarget()
    await target.up()  # learn a free port, then go down
    await target.down()
    async with (
        WebhookHandler(target.url) as webhook,
        running_worker(settings, destination, webhook, retry=QUICK) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule(destination, {"incident": 42}, delay=0, keys=["i:42"])
        async with asyncio.timeout(15):
            await worker.wait_for(lambda st: st.failed >= 2)
            await target.up()
            await worker.wait_for(lambda st: st.executed == 1)
    await target.down()
    assert len(target.received) == 1
    headers, body = target.received[0]
    assert headers["idempotency-key"] == s.id
    assert body["id"] == s.id
    assert body["destination"] == destination
    assert body["payload"] == {"incident": 42}
    assert body["keys"] == ["i:42"]
    assert body["attempt"] >= 3
    assert body["due_at"].endswith("+00:00")


async def test_a_non_2xx_answer_is_a_failed_attempt(settings: Settings, destination: str) -> None:
    target = WebhookTarget(statuses=[503, 404])
    await target.up()
    try:
        async with (
            WebhookHandler(target.url) as webhook,
            running_worker(settings, destination, webhook, retry=QUICK) as worker,
            Scheduler(settings) as scheduler,
        ):
            await scheduler.schedule(destination, b"\x00raw", delay=0, content_type="text/plain")
            async with asyncio.timeout(15):
                await worker.wait_for(lambda st: st.executed == 1)
    finally:
        await target.down()
    assert worker.stats.failed == 2
    assert [body["attempt"] for _, body in target.received] == [1, 2, 3]
    assert target.received[-1][1]["payload_base64"] == "AHJhdw=="
