"""Resource alarms: RabbitMQ blocks every publishing connection while a node is short of
disk or memory. Raised here at run time (rabbitmqctl), on the test broker alone, and put
back as it was whatever happens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest
from pydantic import SecretStr

from rmqdelay import BrokerBlockedError, Scheduler, Settings
from rmqdelay.tools.status import collect

from .conftest import TestBroker
from .helpers import Recorder, Server, running_worker

pytestmark = pytest.mark.integration

TOKEN = "alarm-test-token"
DEADLINE_S = 3.0

#: How to raise each alarm, how to read and set the limit behind it (Erlang, so that the
#: value read is put back exactly), and the reason RabbitMQ gives in connection.blocked.
ALARMS = {
    "disk": (
        ("set_disk_free_limit", "10000GB"),
        "rabbit_disk_monitor:get_disk_free_limit()",
        "rabbit_disk_monitor:set_disk_free_limit",
        "low on disk",
    ),
    "memory": (
        ("set_vm_memory_high_watermark", "absolute", "10MB"),
        "vm_memory_monitor:get_vm_memory_high_watermark()",
        "vm_memory_monitor:set_vm_memory_high_watermark",
        "low on memory",
    ),
}


@contextmanager
def resource_alarm(broker: TestBroker, which: str) -> Iterator[str]:
    """The broker with ``which`` alarm raised; yields RabbitMQ's reason for it."""
    raise_it, read, write, reason = ALARMS[which]
    saved = broker.run("ctl", "eval", f"{read}.").strip()
    assert saved, f"could not read the {which} limit"
    broker.run("ctl", *raise_it)
    try:
        yield reason
    finally:
        broker.run("ctl", "eval", f"{write}({saved}).")


async def _until(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``condition()``: the management API's samples have no event to await."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what}") from None


async def _refused(scheduler: Scheduler, destination: str, n: str, reason: str) -> str:
    """schedule() under the alarm: refused naming it, at the deadline. Its message (and
    how long it took, printed: the figure docs/explanation/reliability.md gives)."""
    started = time.monotonic()
    with pytest.raises(BrokerBlockedError) as caught:
        await scheduler.schedule(destination, {"n": n}, delay=1)
    took = time.monotonic() - started
    assert DEADLINE_S - 0.2 <= took <= DEADLINE_S + 1, took
    assert caught.value.alarm == reason
    message = str(caught.value)
    assert caught.value.sent == message.endswith("when the alarm clears"), message
    assert repr(reason) in message, message
    assert "RMQDELAY_PUBLISH_DEADLINE (3s)" in message, message
    print(f"\n{n}: BrokerBlockedError after {took:.2f}s: ...{message[-60:]}")
    return message


@pytest.mark.timeout(240)
@pytest.mark.parametrize("which", ["disk", "memory"])
async def test_an_alarm_fails_schedule_at_its_deadline_naming_it_and_workers_go_on(
    own_settings: Settings, test_broker: TestBroker, which: str
) -> None:
    settings = own_settings.model_copy(
        update={
            "publish_deadline": timedelta(seconds=DEADLINE_S),
            "http_token": SecretStr(TOKEN),
        }
    )
    destination, recorder = "dest", Recorder()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        Scheduler(settings) as scheduler,
        running_worker(settings, destination, recorder),
    ):
        with Server(settings) as url:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                # Tasks that come due while the alarm is raised; and one publish through
                # the API first, as any running service has made.
                due_during = [
                    await scheduler.schedule(destination, {"n": i}, delay=timedelta(seconds=5))
                    for i in range(20)
                ]
                reply = await client.post(
                    "/v1/tasks",
                    json={"destination": destination, "payload": {"n": "api"}, "delay": "1s"},
                )
                assert reply.status_code == 201, reply.text
                due_during.append(await scheduler.schedule(destination, {"n": "x"}, delay=6))
                with resource_alarm(test_broker, which) as reason:
                    # RabbitMQ tells a connection of the alarm when it next publishes: the
                    # first publish is written before the client can know.
                    first = await _refused(scheduler, destination, "maybe", reason)
                    assert await scheduler.alarm() == reason
                    second = await _refused(scheduler, destination, "refused", reason)
                    assert second.endswith("nothing was sent"), second
                    # A destination not seen yet is looked up first, on the same blocked
                    # connection: bounded by the deadline too.
                    third = await _refused(scheduler, "not-seen-yet", "unchecked", reason)
                    assert third.endswith("nothing was published"), third
                    assert first.endswith(("nothing was sent", "when the alarm clears")), first

                    started = time.monotonic()
                    reply = await client.post(
                        "/v1/tasks",
                        json={
                            "destination": destination,
                            "payload": {"n": "api-refused"},
                            "delay": "1s",
                        },
                    )
                    assert time.monotonic() - started <= DEADLINE_S + 4
                    assert reply.status_code == 503, reply.text
                    problem = reply.json()
                    assert problem["error"] == "BrokerBlockedError", problem
                    assert reason in problem["message"], problem
                    health = await client.get("/healthz")
                    assert health.status_code == 503, health.text
                    assert reason in health.text, health.text

                    # The worker's acks go on a connection that does not publish.
                    await recorder.wait_for({s.id for s in due_during}, within=30)

                    shown = "DISK ALARM" if which == "disk" else "MEMORY ALARM"

                    async def in_status() -> bool:
                        status = await collect(settings, [destination])
                        return status.source != "management" or any(
                            shown in w for w in status.warnings
                        )

                    # The management API samples nodes every 5 s.
                    await _until(in_status, 30, f"rmqdelay status to show {shown}")
                    status = await collect(settings, [destination])
                    if status.source == "management":
                        assert any(a.endswith(f": {which}") for a in status.alarms), status

                # Cleared: publishing resumes on the same connections.
                after = await scheduler.schedule(destination, {"n": "after"}, delay=1)
                reply = await client.post(
                    "/v1/tasks",
                    json={"destination": destination, "payload": {"n": "api-2"}, "delay": "1s"},
                )
                assert reply.status_code == 201, reply.text
                await recorder.wait_for({after.id, reply.json()["id"]}, within=30)
    payloads = [task.payload for task, _ in recorder.runs]
    assert {"n": "refused"} not in payloads, "a publish said to be unsent ran"
    assert {"n": "api"} in payloads
    maybe_ran = {"n": "maybe"} in payloads
    assert not (maybe_ran and first.endswith("nothing was sent")), "said unsent, but ran"
    print(f"\nthe first publish of the alarm ran after it cleared: {maybe_ran}")
    assert max(recorder.counts.values()) == 1, "a task ran twice"
