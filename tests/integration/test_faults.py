"""Fault tests: processes and the broker dying under load. Bounded in time."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from rmqdelay import Scheduler, Settings

from .conftest import ROOT
from .helpers import Recorder, running_worker

pytestmark = pytest.mark.integration


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMQDELAY_")}
    env.update(RMQDELAY_URL=settings.url, RMQDELAY_NAMESPACE=settings.namespace)
    env["PYTHONPATH"] = str(ROOT)
    return env


async def test_a_worker_killed_mid_handler_leaves_the_task_to_the_next_worker(
    settings: Settings, destination: str
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {"step": "charge card"}, delay=0)
    doomed = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", "consume", destination,
        "--handler", "tests.integration.handlers:hang",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=_env(settings),
    )  # fmt: skip
    assert doomed.stdout is not None
    try:
        line = await asyncio.wait_for(doomed.stdout.readline(), 30)
        assert line.decode().strip() == f"started {s.id}"
    finally:
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    recorder = Recorder()
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({s.id}, within=20)
    task = recorder.runs[0][0]
    assert task.redelivered
    assert task.payload == {"step": "charge card"}
