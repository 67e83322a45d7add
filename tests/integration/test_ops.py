"""Ops against the real broker: importing definitions, the startup check, status, backends."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import trustme

from rmqdelay import (
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    Scheduler,
    Settings,
    Task,
    TopologyMismatchError,
)
from rmqdelay.broker.declare import apply_topology, resolve_backend
from rmqdelay.cli.main import main
from rmqdelay.core.topology import build_topology

from .conftest import TestBroker, cannot, make_settings, management_api
from .helpers import Recorder, depth, running_worker, subprocess_env
from .proxy import Proxy

pytestmark = pytest.mark.integration


def _with_vhost(url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def _render(path: Path, *argv: str) -> dict[str, object]:
    assert main(["definitions", "-o", str(path), *argv]) == 0
    document: dict[str, object] = json.loads(path.read_text())
    return document


async def _import(broker: TestBroker, path: Path) -> None:
    """rabbitmqctl import_definitions on the test broker's node (through its control)."""
    if broker.control is None:
        cannot("RMQDELAY_TEST_BROKER_CONTROL is not set: this test runs rabbitmqctl on the node")
    await asyncio.to_thread(broker.run, "import", str(path))


def _queue_names(settings: Settings, vhost: str) -> list[str]:
    with management_api(settings) as api:
        queues = api.get(f"/api/queues/{quote(vhost, safe='')}", params={"columns": "name"})
        return [q["name"] for q in queues.raise_for_status().json()]


@pytest.fixture
def vhost(settings: Settings) -> Iterator[str]:
    """A vhost name of this test's own; the vhost (if the test made it) is deleted after."""
    name = f"rmqdelay-import-{uuid.uuid4().hex[:8]}"
    yield name
    with management_api(settings) as api:
        api.delete(f"/api/vhosts/{quote(name, safe='')}")


async def _serves_tasks_without_declaring(settings: Settings, destination: str) -> None:
    """Schedule and execute (and cancel) with client-side declaring off."""
    assert not settings.declare
    recorder = Recorder()
    async with running_worker(settings, destination, recorder), Scheduler(settings) as scheduler:
        kept = await scheduler.schedule(destination, {"n": 1}, delay=0.3, keys=["k1"])
        dropped = await scheduler.schedule(destination, {"n": 2}, delay=0.6, keys=["k2"])
        await scheduler.cancel("k2")
        await recorder.wait_for({kept.id}, within=20)
        marker = await scheduler.schedule(destination, {"n": 3}, delay=0.7)
        await recorder.wait_for({marker.id}, within=20)
    assert dropped.id not in recorder.ids
    assert min(recorder.lateness_ms().values()) >= 0


async def test_definitions_imported_with_rabbitmqctl_serve_clients_that_do_not_declare(
    settings: Settings, vhost: str, tmp_path: Path, test_broker: TestBroker
) -> None:
    user = urlsplit(settings.url).username or "guest"
    path = tmp_path / "definitions.json"
    _render(path, "--namespace", "ops", "--vhost", vhost, "--max-delay", "1d", "--user", user,
            "--resolution-ms", "10", "--policies", "alarms")  # fmt: skip
    await _import(test_broker, path)
    imported = make_settings(
        _with_vhost(settings.url, vhost),
        namespace="ops",
        max_delay="1d",
        resolution_ms=10,
        declare=False,
    )
    await _serves_tasks_without_declaring(imported, "alarms")

    # The startup check: settings the imported topology does not fit are refused, and
    # checking creates nothing.
    coarser = imported.model_copy(update={"resolution_ms": 20})
    with pytest.raises(TopologyMismatchError, match=r"ops\.level\.00.*x-message-ttl"):
        await Scheduler(coarser).start()
    longer = make_settings(
        imported.url, namespace="ops", max_delay="2d", resolution_ms=10, declare=False
    )
    assert longer.levels == imported.levels + 1
    with pytest.raises(TopologyMismatchError, match=r"'ops\.(after|level)\.24' does not exist"):
        await Scheduler(longer).start()
    with pytest.raises(TopologyMismatchError, match="RMQDELAY_DECLARE is false"):
        async with running_worker(imported, "not-imported", Recorder()):
            pass
    listed = _queue_names(settings, vhost)
    assert "ops.level.24" not in listed
    assert "ops.work.not-imported" not in listed
    assert len([q for q in listed if q.startswith("ops.level.")]) == imported.levels


async def test_definitions_imported_through_the_management_api_serve_clients(
    settings: Settings, vhost: str, tmp_path: Path
) -> None:
    user = urlsplit(settings.url).username or "guest"
    document = _render(tmp_path / "d.json", "--namespace", "api", "--vhost", vhost,
                       "--max-delay", "1h", "--resolution-ms", "256", "--user", user,
                       "reports")  # fmt: skip
    with management_api(settings) as api:
        response = api.post("/api/definitions", json=document)
        assert response.status_code in (200, 201, 204), response.text
    imported = make_settings(
        _with_vhost(settings.url, vhost), namespace="api", max_delay="1h", declare=False
    )
    await _serves_tasks_without_declaring(imported, "reports")


async def test_a_restricted_user_is_limited_to_its_namespace(
    settings: Settings, vhost: str, tmp_path: Path, test_broker: TestBroker
) -> None:
    user, password = f"svc-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with management_api(settings) as api:
        api.put(f"/api/users/{user}", json={"password": password, "tags": ""}).raise_for_status()
    try:
        path = tmp_path / "definitions.json"
        _render(path, "--namespace", "svc", "--vhost", vhost, "--max-delay", "1h", "--user", user,
                "--resolution-ms", "256", "x")  # fmt: skip
        await _import(test_broker, path)
        parts = urlsplit(_with_vhost(settings.url, vhost))
        url = urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc.split('@')[-1]}"))
        own = make_settings(url, namespace="svc", max_delay="1h", declare=False)
        await _serves_tasks_without_declaring(own, "x")
        # The same user may declare (re-declare) its namespace, and nothing outside it.
        async with Scheduler(own.model_copy(update={"declare": True})):
            pass
        foreign = make_settings(url, namespace="other", max_delay="1h", declare=True)
        with pytest.raises(BrokerError, match=r"not allowed to declare exchange 'other\.") as info:
            await Scheduler(foreign).start()
        assert password not in str(info.value)
    finally:
        with management_api(settings) as api:
            api.delete(f"/api/users/{user}")


@pytest.fixture
async def small(broker_url: str) -> AsyncIterator[Settings]:
    """A namespace of the test's own (1 h max delay: 19 levels), deleted afterwards."""
    settings = make_settings(broker_url, max_delay="1h")
    yield settings
    await apply_topology(settings, build_topology(settings.layout, ("a", "b")), delete=True)


def _status(settings: Settings, *argv: str, management: str | None = None) -> str:
    env = subprocess_env(settings)
    env["RMQDELAY_MAX_DELAY"] = "1h"
    if management is not None:
        env["RMQDELAY_MANAGEMENT_URL"] = management
    done = subprocess.run(
        [sys.executable, "-m", "rmqdelay", "status", *argv],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert settings.url.split("@")[0].split(":")[-1] not in done.stderr + done.stdout
    return done.stdout


async def _fill(settings: Settings) -> None:
    async with Scheduler(settings) as scheduler:
        for destination in ("a", "b"):
            await scheduler.declare_destination(destination)
        for i in range(3):
            await scheduler.schedule("a", {"i": i}, delay=0)
        for i in range(2):
            await scheduler.schedule("b", {"i": i}, delay=timedelta(minutes=50))
        await scheduler.cancel("some-key")
    queue = settings.names.work_queue("a")
    for _ in range(200):
        if await depth(settings, queue) == 3:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the three tasks due now never reached their work queue")


async def _settled_status(settings: Settings, *argv: str) -> dict[str, Any]:
    """Status once it shows what _fill left: the management API samples its counts (every
    5 s by default), so a fresh snapshot may lag."""
    async with asyncio.timeout(30):
        while True:
            document: dict[str, Any] = json.loads(
                await asyncio.to_thread(_status, settings, "--json", *argv)
            )
            ready = {d["destination"]: d["ready"] for d in document["destinations"]}
            if ready.get("a") == 3 and sum(lv["pending"] or 0 for lv in document["levels"]) == 2:
                return document
            await asyncio.sleep(0.5)


async def test_status_shows_levels_destinations_parked_and_cancels(small: Settings) -> None:
    await _fill(small)
    document = await _settled_status(small)
    assert document["namespace"] == small.namespace
    assert document["backend"] == "levels"
    unit = small.resolution_ms
    assert [lv["ttl_ms"] for lv in document["levels"]] == [unit << k for k in range(small.levels)]
    # 50 minutes in whole units: the two tasks wait in the level of the highest set bit
    pending = {lv["level"]: lv["pending"] for lv in document["levels"] if lv["pending"]}
    assert pending == {(3_000_000 // unit).bit_length() - 1: 2}
    destinations = {d["destination"]: d for d in document["destinations"]}
    assert destinations["a"]["ready"] == 3
    assert destinations["a"]["consumers"] == 0
    assert destinations["b"]["ready"] == 0
    assert document["parked"] == 0
    assert document["unroutable"] == 0
    assert document["cancel_records"] >= 1
    if document["source"] == "management":
        assert destinations["a"]["unacked"] == 0
        assert set(destinations) == {"a", "b"}  # listed without being named
        # quorum levels: led by this (single) node, every member online, nothing to warn
        assert all(lv["leader"] and lv["online"] == lv["members"] for lv in document["levels"])
        assert not [w for w in document["warnings"] if "members online" in w]
    text = await asyncio.to_thread(_status, small, "a")
    assert f"namespace {small.namespace}" in text
    unacked = "0" if document["source"] == "management" else "-"
    assert ["a", "3", unacked, "0"] in [line.split() for line in text.splitlines()]


async def test_status_without_the_management_api_counts_over_amqp(small: Settings) -> None:
    await _fill(small)
    nowhere = "http://127.0.0.1:9"  # discard port: nothing answers
    document = json.loads(
        await asyncio.to_thread(_status, small, "--json", "a", "missing", management=nowhere)
    )
    assert document["source"] == "amqp"
    destinations = {d["destination"]: d for d in document["destinations"]}
    assert destinations["a"]["ready"] == 3
    assert destinations["a"]["unacked"] is None
    assert destinations["missing"]["exists"] is False
    assert any("management API not reachable" in n for n in document["notes"])
    assert sum(lv["pending"] for lv in document["levels"]) == 2


async def test_status_watch_refreshes_until_interrupted(small: Settings) -> None:
    await _fill(small)
    env = subprocess_env(small)
    env["RMQDELAY_MAX_DELAY"] = "1h"
    # Ctrl-C as at a terminal: a run started in the background of a shell without job
    # control inherits SIGINT ignored, and an ignored signal stays ignored across exec.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", "status", "--json", "--watch", "200ms",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines = [await asyncio.wait_for(process.stdout.readline(), 30) for _ in range(3)]
    finally:
        process.send_signal(signal.SIGINT)
        # Read on: a pipe left full would block its last writes and its exit.
        await asyncio.wait_for(process.communicate(), 30)
        code = process.returncode
    assert all(json.loads(line)["namespace"] == small.namespace for line in lines)
    assert code == 130


async def test_backend_auto_falls_back_to_levels_without_breaking_the_connection(
    settings: Settings, destination: str
) -> None:
    auto = settings.model_copy(update={"backend": "auto"})
    resolved = await resolve_backend(auto)
    if resolved.backend == "plugin":
        pytest.skip("this broker has the delayed-message plugin; the fallback is not reachable")
    recorder = Recorder()
    async with running_worker(auto, destination, recorder), Scheduler(auto) as scheduler:
        assert scheduler.settings.backend == "levels"
        s = await scheduler.schedule(
            destination, {"via": "auto"}, delay=2.5 * settings.resolution_ms / 1000
        )
        assert s.hops == 1  # two whole units: level 1
        await recorder.wait_for({s.id}, within=20)
        assert not scheduler.connection.is_closed


@pytest.fixture
async def plugin(broker_url: str) -> AsyncIterator[Settings]:
    """Settings for the plugin backend, or a skip when the broker lacks it."""
    settings = make_settings(broker_url, backend="plugin")
    if (await resolve_backend(settings.model_copy(update={"backend": "auto"}))).backend != "plugin":
        await apply_topology(settings, build_topology(settings.layout), delete=True)
        pytest.skip(
            "the broker has no x-delayed-message exchange type (rabbitmq_delayed_message_exchange "
            "is not enabled: Debian does not package it, and it cannot run on RabbitMQ 4.3)"
        )
    yield settings
    await apply_topology(settings, build_topology(settings.layout, ("p",)), delete=True)


async def test_plugin_backend_delivers_on_time_and_cancels(plugin: Settings) -> None:
    recorder = Recorder()
    async with running_worker(plugin, "p", recorder), Scheduler(plugin) as scheduler:
        kept = await scheduler.schedule("p", {"n": 1}, delay=0.5, keys=["keep"])
        dropped = await scheduler.schedule("p", {"n": 2}, delay=0.5, keys=["drop"])
        later = await scheduler.schedule("p", {"n": 3}, delay=0.8)
        await scheduler.cancel("drop")
        await recorder.wait_for({kept.id, later.id}, within=20)
    assert dropped.id not in recorder.ids
    assert min(recorder.lateness_ms().values()) >= 0
    assert kept.hops == 1


async def test_plugin_backend_retries_through_the_plugin(plugin: Settings) -> None:
    retrying = plugin.model_copy(update={"backoff_base": timedelta(milliseconds=300)})
    attempts: list[tuple[int, float]] = []

    async def fail_once(task: Task) -> None:
        attempts.append((task.attempt, time.monotonic()))
        if task.attempt == 1:
            raise RuntimeError("first attempt fails")

    async with running_worker(retrying, "p", fail_once) as worker, Scheduler(retrying) as s:
        await s.schedule("p", {}, delay=0)
        async with asyncio.timeout(30):
            stats = await worker.wait_for(lambda st: st.executed >= 1)
    assert stats.retried == 1
    assert [a for a, _ in attempts] == [1, 2]
    assert attempts[1][1] - attempts[0][1] >= 0.15  # equal jitter: at least half the base


def test_credentials_never_reach_errors_or_logs(settings: Settings) -> None:
    secret = "s3cret-" + uuid.uuid4().hex[:6]
    parts = urlsplit(settings.url)
    host = parts.netloc.split("@")[-1]
    for url in (
        urlunsplit(parts._replace(netloc=f"guest:{secret}@{host}")),  # wrong password
        urlunsplit(parts._replace(netloc=f"guest:{secret}@127.0.0.1:9")),  # nothing there
    ):
        env = {**subprocess_env(make_settings(url)), "RMQDELAY_CONNECT_TIMEOUT": "1s"}
        done = subprocess.run(
            [sys.executable, "-m", "rmqdelay", "--log-level", "DEBUG", "schedule", "x", "{}",
             "--delay", "1s"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1
        assert "cannot connect to RabbitMQ" in done.stderr
        assert secret not in done.stdout + done.stderr
        assert "guest:******@" in done.stderr
        for command in (
            ["status"],
            ["pending"],
            ["parked"],
            ["schedule", "x", "{}", "--delay", "1s"],
        ):
            done = subprocess.run(
                [sys.executable, "-m", "rmqdelay", *command],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            assert done.returncode == 1, command
            lines = done.stderr.splitlines()
            assert lines[-1].startswith("rmqdelay: error: cannot connect to RabbitMQ"), command
            assert "Traceback" not in done.stderr
            if "127.0.0.1:9/" not in url:  # refused at once: no retries to tell of
                assert len(lines) == 1, f"one line from {command}: {done.stderr}"
            assert secret not in done.stdout + done.stderr


@pytest.fixture
def pki(tmp_path: Path) -> tuple[ssl.SSLContext, dict[str, Path]]:
    """A private CA, a server context for 127.0.0.1 that requires client certificates, and
    the files a client needs."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ca.issue_cert("rmqdelay-worker@example.org")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    return server, files


async def test_amqps_with_a_private_ca_and_a_client_certificate(
    settings: Settings, destination: str, pki: tuple[ssl.SSLContext, dict[str, Path]]
) -> None:
    server, files = pki
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
    async with Proxy(settings.url, tls=server) as proxy:
        assert proxy.url.startswith("amqps://")
        tls = make_settings(
            proxy.url, namespace=settings.namespace, declare=False, connect_timeout="3s",
            tls_ca_file=files["ca"], tls_cert_file=files["cert"], tls_key_file=files["key"],
        )  # fmt: skip
        recorder = Recorder()
        async with running_worker(tls, destination, recorder), Scheduler(tls) as scheduler:
            s = await scheduler.schedule(destination, {"over": "tls"}, delay=0.1)
            await recorder.wait_for({s.id}, within=20)
        assert proxy.connections >= 2

        no_client_cert = tls.model_copy(update={"tls_cert_file": None, "tls_key_file": None})
        with pytest.raises(BrokerUnavailableError) as refused:
            await Scheduler(no_client_cert).start()
        untrusted = tls.model_copy(update={"tls_ca_file": None})
        with pytest.raises(BrokerUnavailableError, match="CERTIFICATE_VERIFY_FAILED") as unknown:
            await Scheduler(untrusted).start()
    password = urlsplit(settings.url).password or "guest"
    for error in (refused.value, unknown.value):
        assert f":{password}@" not in str(error)
        assert "RMQDELAY_TLS" in str(error)


def test_tls_files_must_exist_and_come_in_pairs(settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="RMQDELAY_TLS_CA_FILE"):
        make_settings(settings.url, tls_ca_file=missing)
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match="give both or neither"):
        make_settings(settings.url, tls_cert_file=tmp_path / "cert.pem")
