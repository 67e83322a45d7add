"""A real broker for the integration tests, and a namespace of their own per run.

The broker comes from RMQDELAY_TEST_URL, else testcontainers when a Docker engine runs,
else scripts/broker (a local rabbitmq-server). Without any, tests skip locally but fail
under CI=true: a CI run that tested nothing must not pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rmqdelay import Settings
from rmqdelay.broker.declare import apply_topology as apply
from rmqdelay.core.topology import build_topology, destination_topology

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"no RabbitMQ for integration tests under CI: {reason}")
    pytest.skip(f"no RabbitMQ for integration tests: {reason}")


def _docker_engine() -> bool:
    # The CLI rather than the docker SDK: the SDK leaks a socket when no engine answers.
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    if url := os.environ.get("RMQDELAY_TEST_URL"):
        yield url
        return
    if _docker_engine():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as broker:
            host, port = broker.get_container_host_ip(), broker.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/%2F"
        return
    # Never let a developer's RMQDELAY_URL (maybe production) leak into the test broker.
    env = {k: v for k, v in os.environ.items() if k != "RMQDELAY_URL"}
    done = subprocess.run(
        [str(ROOT / "scripts" / "broker")], capture_output=True, text=True, timeout=600, env=env
    )
    if done.returncode != 0:
        _unavailable(f"scripts/broker failed: {done.stderr.strip()[-800:]}")
    yield done.stdout.strip().splitlines()[-1]


def make_settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": url,
        "namespace": f"rmqdelay-test-{uuid.uuid4().hex[:8]}",
        "queue_type": "quorum",
        # Coarse enough that tasks arrive early and are held (the default is 1,024 ms), fine
        # enough that delays of a second or two still take hops through the levels.
        "resolution_ms": 256,
        "max_delay": timedelta(days=3653),
        "declare": True,
        "prefetch": 32,
        "concurrency": 16,
        "connect_timeout": timedelta(seconds=20),
        "shutdown_grace": timedelta(seconds=5),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def settings(broker_url: str) -> Iterator[Settings]:
    """One namespace (so one set of delay levels) for the whole run, deleted afterwards."""
    settings = make_settings(broker_url)
    try:
        asyncio.run(apply(settings, build_topology(settings.layout)))
    except OSError as e:
        _unavailable(f"cannot reach {settings.safe_url}: {e}")
    yield settings
    asyncio.run(apply(settings, build_topology(settings.layout), delete=True))


@pytest.fixture
async def destination(settings: Settings) -> AsyncIterator[str]:
    """A destination of this test's own; its work queue is deleted afterwards."""
    name = f"dest-{uuid.uuid4().hex[:8]}"
    yield name
    await apply(settings, destination_topology(settings.layout, name), delete=True)


@pytest.fixture
async def own_settings(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of this test's own (1 h max delay: 19 levels), for tests that read a
    whole queue (the parking lot) or run subprocesses over it; deleted afterwards."""
    settings = make_settings(broker_url, max_delay=timedelta(hours=1))
    await apply(settings, build_topology(settings.layout, ("dest",)))
    yield settings
    await apply(settings, build_topology(settings.layout, ("dest",)), delete=True)
