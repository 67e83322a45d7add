"""A real broker for the integration tests, and a namespace of their own per run.

The broker comes from the environment, and tests reach it only through what it gives:

- ``RMQDELAY_TEST_URL``: its AMQP URL;
- ``RMQDELAY_TEST_MANAGEMENT_URL``: its management API (tests that need it skip without);
- ``RMQDELAY_TEST_BROKER_CONTROL``: a command that takes ``stop``, ``kill`` (-9),
  ``restart``, ``import FILE`` (rabbitmqctl import_definitions), ``ctl ARGS`` (rabbitmqctl
  ARGS) and ``version`` for this broker alone, as ``scripts/broker`` does for the node it
  started (fault tests skip without it).

Without ``RMQDELAY_TEST_URL``: testcontainers when a Docker engine runs, else
``scripts/broker`` (RabbitMQ ``RMQDELAY_BROKER_VERSION``, 4.3 by default), which gives all
three. Without any broker, tests skip locally but fail under CI=true: a CI run that tested
nothing must not pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import httpx
import pytest

from rmqdelay import Settings
from rmqdelay.broker.declare import apply_topology as apply
from rmqdelay.core.delivery_limits import parse_version
from rmqdelay.core.redact import split_urls
from rmqdelay.core.topology import build_topology, destination_topology

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
#: Where no management API listens: a test without RMQDELAY_TEST_MANAGEMENT_URL must not
#: fall back to port 15672 of the broker's host, which may be another broker's.
NO_MANAGEMENT = "http://127.0.0.1:1"


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def cannot(reason: str) -> None:
    """Skip locally; fail under CI, where every test must run."""
    if under_ci():
        pytest.fail(f"cannot run under CI: {reason}")
    pytest.skip(reason)


def _unavailable(reason: str) -> None:
    cannot(f"no RabbitMQ for integration tests: {reason}")


def _docker_engine() -> bool:
    # The CLI rather than the docker SDK: the SDK leaks a socket when no engine answers.
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass(frozen=True)
class TestBroker:
    """The broker under test, as the environment gives it."""

    __test__ = False  # not a test class, whatever its name

    url: str
    management_url: str | None = None
    #: A command acting on this broker alone (``scripts/broker``'s verbs), if any.
    control: str | None = None

    def run(self, *args: str, timeout: float = 240) -> str:
        """``<control> ARGS``; its stdout. Skips (fails under CI) without a control."""
        if self.control is None:
            cannot("RMQDELAY_TEST_BROKER_CONTROL is not set: this test acts on the broker")
        assert self.control is not None
        done = subprocess.run(
            [*self.control.split(), *args], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(f"{self.control} {' '.join(args)}: {done.stderr[-800:]}")
        return done.stdout

    def kill_and_restart(self) -> None:
        """kill -9 the broker, then start it again with its data (skips without control)."""
        self.run("kill")
        self.run("restart")


def _from_environment() -> TestBroker | None:
    url = os.environ.get("RMQDELAY_TEST_URL")
    if not url:
        return None
    return TestBroker(
        url,
        os.environ.get("RMQDELAY_TEST_MANAGEMENT_URL") or None,
        os.environ.get("RMQDELAY_TEST_BROKER_CONTROL") or None,
    )


def _publish(broker: TestBroker) -> None:
    """Make the broker what every make_settings() and subprocess of this run sees."""
    os.environ["RMQDELAY_TEST_URL"] = broker.url
    for name, value in (
        ("RMQDELAY_TEST_MANAGEMENT_URL", broker.management_url),
        ("RMQDELAY_TEST_BROKER_CONTROL", broker.control),
    ):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def test_broker() -> Iterator[TestBroker]:
    if (given := _from_environment()) is not None:
        yield given
        return
    if _docker_engine():
        from testcontainers.rabbitmq import RabbitMqContainer

        version = os.environ.get("RMQDELAY_BROKER_VERSION", "4.3")
        with RabbitMqContainer(f"rabbitmq:{version}-management") as container:
            host = container.get_container_host_ip()
            broker = TestBroker(
                f"amqp://guest:guest@{host}:{container.get_exposed_port(5672)}/%2F",
                f"http://{host}:{container.get_exposed_port(15672)}",
            )
            _publish(broker)
            yield broker
        return
    script = str(ROOT / "scripts" / "broker")
    # Never let a developer's RMQDELAY_URL (maybe production) leak into the test broker.
    env = {k: v for k, v in os.environ.items() if k != "RMQDELAY_URL"}
    done = subprocess.run([script], capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        _unavailable(f"scripts/broker failed: {done.stderr.strip()[-800:]}")
    management = subprocess.run(
        [script, "management"], capture_output=True, text=True, timeout=30, env=env, check=True
    )
    broker = TestBroker(done.stdout.strip().splitlines()[-1], management.stdout.strip(), script)
    _publish(broker)
    yield broker


@pytest.fixture(scope="session")
def broker_url(test_broker: TestBroker) -> str:
    return test_broker.url


@pytest.fixture(scope="session")
def test_broker_version(broker_url: str) -> tuple[int, int]:
    """The test broker's major and minor version, as it announces itself over AMQP."""

    async def ask() -> str:
        connection = await aio_pika.connect(split_urls(broker_url)[0], timeout=20)
        async with connection:
            return str(connection.transport.connection.server_properties["version"])

    version = parse_version(asyncio.run(ask()))
    assert version is not None
    return version


def need_management(settings: Settings) -> str:
    """The management API of the test broker; skips (fails under CI) without one."""
    if settings.management_url in (None, NO_MANAGEMENT):
        cannot("RMQDELAY_TEST_MANAGEMENT_URL is not set: this test needs the management API")
    assert settings.management_url is not None
    return settings.management_url


@contextmanager
def management_api(settings: Settings) -> Iterator[httpx.Client]:
    """A client of the test broker's management API, as the AMQP URL's user."""
    parts = urlsplit(split_urls(settings.url)[0])
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    with httpx.Client(base_url=need_management(settings), auth=auth, timeout=30) as client:
        yield client


def make_settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "url": url,
        "namespace": f"rmqdelay-test-{uuid.uuid4().hex[:8]}",
        "queue_type": "quorum",
        # Coarse enough that tasks arrive early and are held (the default is 1,024 ms), fine
        # enough that delays of a second or two still take hops through the levels.
        "resolution_ms": 256,
        # One unit (the default is 16 s): tasks due in a second or two still go through the
        # levels, which is what most tests look at; test_hold.py covers wider windows.
        "hold_window": timedelta(milliseconds=256),
        "max_delay": timedelta(days=3653),
        "declare": True,
        "prefetch": 32,
        "concurrency": 16,
        "connect_timeout": timedelta(seconds=20),
        "shutdown_grace": timedelta(seconds=5),
        "management_url": os.environ.get("RMQDELAY_TEST_MANAGEMENT_URL") or NO_MANAGEMENT,
    }
    values.update(overrides)
    if "resolution_ms" in overrides and "hold_window" not in overrides:
        values["hold_window"] = timedelta(milliseconds=int(str(values["resolution_ms"])))
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
