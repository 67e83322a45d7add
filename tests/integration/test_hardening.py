"""The command line against a real broker, as a careless user or an attacker would use it."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rmqdelay import InvalidPayloadError, RetryPolicy, Scheduler, Settings, Task
from rmqdelay.broker.declare import apply_topology
from rmqdelay.cli.main import RET_ABANDONED, RET_ERROR, RET_OK, main
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import PARKED_REASON, TASK_ID
from rmqdelay.tools.parking import ParkingLot

from .conftest import make_settings, management_api, need_management
from .helpers import Recorder, depth, get_all, running_worker, subprocess_env, use_in_cli
from .proxy import Proxy
from .test_cli import _line_with
from .webhook_target import WebhookTarget

pytestmark = pytest.mark.integration


def _rmqdelay(settings: Settings, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rmqdelay", *argv],
        capture_output=True, text=True, timeout=60, env={**subprocess_env(settings), **env},
    )  # fmt: skip


async def _worker(settings: Settings, *argv: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**subprocess_env(settings), **env},
    )  # fmt: skip


def test_the_broker_may_open_enough_files_for_many_namespaces(settings: Settings) -> None:
    # A node's figures come with its first statistics sample, seconds after it started.
    deadline = time.monotonic() + 30
    with management_api(settings) as api:
        while True:
            nodes = api.get("/api/nodes").raise_for_status().json()
            if all("fd_total" in node for node in nodes) or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # polling the management API: it offers no event
    for node in nodes:
        # 1,024 (Debian's wrapper through su) stops AMQP handshakes after ~7 namespaces.
        assert node.get("fd_total", 0) >= 10_000, f"{node['name']}: {node.get('fd_total')}"


async def test_sys_exit_in_a_plain_handler_does_not_stop_the_cli_worker(
    own_settings: Settings,
) -> None:
    settings, destination = own_settings, "dest"
    worker = await _worker(
        settings, "consume", destination, "--handler",
        "tests.integration.handlers:exit_unless_good", "--max-attempts", "2",
        "--backoff-base", "10ms",
    )  # fmt: skip
    assert worker.stdout is not None
    assert worker.stderr is not None
    try:
        await _line_with(worker.stderr, "consuming", within=30)
        async with Scheduler(settings) as scheduler:
            bad = await scheduler.schedule(destination, "exit", delay=0)
            good = await scheduler.schedule(destination, "good", delay=0.3)
        line = await _line_with(worker.stdout, "executed", within=20)
        assert line.strip() == f"executed {good.id} good"
        assert worker.returncode is None, "the worker is still running"
        worker.send_signal(signal.SIGTERM)
        err = (await asyncio.wait_for(worker.stderr.read(), 30)).decode()
        assert await asyncio.wait_for(worker.wait(), 30) == RET_OK
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert "parked 1" in err
    parked = await get_all(settings, settings.names.parked)
    assert [m.headers[TASK_ID] for m in parked] == [bad.id]
    assert "SystemExit(3)" in parked[0].headers[PARKED_REASON]


async def test_a_stuck_plain_handler_cannot_hold_the_process_after_the_grace_period(
    settings: Settings, destination: str
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        s = await scheduler.schedule(destination, {}, delay=0)
    worker = await _worker(
        settings, "consume", destination, "--handler", "tests.integration.handlers:hang",
        RMQDELAY_SHUTDOWN_GRACE="1s",
    )  # fmt: skip
    assert worker.stdout is not None
    assert worker.stderr is not None
    try:
        line = await asyncio.wait_for(worker.stdout.readline(), 30)
        assert line.decode().strip() == f"started {s.id}"
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), 30)
        took = time.monotonic() - stopped_at
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    err = (await worker.stderr.read()).decode()
    assert code == RET_ABANDONED, err
    assert took < 15, "grace (1 s) plus the unwind allowance, not forever"
    assert "abandoning 1 handler(s)" in err
    recorder = Recorder()
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({s.id}, within=20)


async def test_no_webhook_or_broker_secret_reaches_logs_or_the_parking_lot(
    own_settings: Settings,
) -> None:
    settings, destination = own_settings, "dest"
    target = WebhookTarget(statuses=[500, 500])
    await target.up()
    secrets = ("hunter2pw", "TOKENabc123", "QUERYsecret9")
    hook = f"http://robot:hunter2pw@127.0.0.1:{target.port}/send/TOKENabc123?key=QUERYsecret9"
    worker = await _worker(
        settings, "--log-level", "DEBUG", "consume", destination, "--webhook", hook,
        "--max-attempts", "2", "--backoff-base", "10ms",
    )  # fmt: skip
    assert worker.stderr is not None
    try:
        await _line_with(worker.stderr, "consuming", within=30)
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule(destination, {"incident": 42}, delay=0)
        async with asyncio.timeout(20):
            while await depth(settings, settings.names.parked) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # another process parks it: no event to await
        worker.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(worker.communicate(), 30)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await target.down()
    assert target.received, "the hook was called"
    listing = _rmqdelay(settings, "parked")
    as_json = _rmqdelay(settings, "parked", "--json")
    everything = out.decode() + err.decode() + listing.stdout + listing.stderr + as_json.stdout
    assert "HTTP Request: POST" in everything, "httpx's request line is shown at DEBUG, masked"
    assert "http://127.0.0.1:" in listing.stdout, "the reason says where, without secrets"
    for secret in (*secrets, "guest:guest"):
        assert secret not in everything, secret
    assert json.loads(as_json.stdout)["error"] == "WebhookError"


@pytest.mark.parametrize("way", ["--webhook-env", "--webhook-file"])
async def test_a_webhook_url_can_stay_out_of_the_process_list(
    own_settings: Settings, way: str, tmp_path: Path
) -> None:
    settings, destination = own_settings, "dest"
    target = WebhookTarget()
    await target.up()
    hook = f"http://127.0.0.1:{target.port}/send/TOKENabc123"
    where = tmp_path / "hook-url"
    where.write_text(hook + "\n")
    given = {"--webhook-env": "MY_HOOK", "--webhook-file": str(where)}[way]
    worker = await _worker(settings, "consume", destination, way, given, MY_HOOK=hook)
    assert worker.stderr is not None
    try:
        await _line_with(worker.stderr, "consuming", within=30)
        command_line = Path(f"/proc/{worker.pid}/cmdline").read_bytes()  # noqa: ASYNC240
        assert b"TOKENabc123" not in command_line
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule(destination, {"incident": 7}, delay=0)
        async with asyncio.timeout(20):
            while not target.received:  # noqa: ASYNC110 - another process posts it
                await asyncio.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.communicate(), 30)
        await target.down()
    assert target.received[0][1]["payload"] == {"incident": 7}


async def test_a_handlers_exception_text_is_redacted_before_it_is_parked(
    own_settings: Settings,
) -> None:
    settings, destination = own_settings, "dest"
    leaks = (
        f"broker {settings.url}",  # the broker URL, password and all
        "https://robot:hunter2pw@api.example.com/v1",  # user info
        "https://hooks.example.com/services/TOKENabc123",  # a token in the path
        "http://api.example.com/send?key=QUERYsecret9",  # a token in the query
        "https://BAREtoken77@api.example.com/",  # a token as the user part
    )

    async def leaky(task: Task) -> None:
        raise ConnectionError("could not reach " + "; ".join(leaks))

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with (
        running_worker(settings, destination, leaky, retry=once) as worker,
        Scheduler(settings) as scheduler,
    ):
        s = await scheduler.schedule(destination, {}, delay=0)
        async with asyncio.timeout(20):
            await worker.wait_for(lambda st: st.parked == 1)
        shown = await ParkingLot(scheduler).show(s.id)
    assert shown is not None
    reason = str(shown.headers[PARKED_REASON])
    assert "ConnectionError: could not reach broker amqp://" in reason
    for secret in ("guest@", ":guest", "hunter2pw", "TOKENabc123", "QUERYsecret9", "BAREtoken77"):
        assert secret not in reason, (secret, reason)
    assert "https://robot:******@api.example.com/..." in reason, "where, not what"
    assert "https://hooks.example.com/..." in reason
    listing = _rmqdelay(settings, "parked", "--json")
    assert "hunter2pw" not in listing.stdout
    assert "TOKENabc123" not in listing.stdout


_PEAK_RSS = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(done.returncode)"
)


async def test_binary_payloads_from_stdin_arrive_byte_for_byte_and_memory_is_bounded(
    own_settings: Settings,
) -> None:
    settings, destination = own_settings, "dest"
    binary = b"\xff\xfe\x00\x01" + bytes(range(256))
    # Through a parent that reports its one child's peak memory on its last stderr line.
    argv = [
        sys.executable, "-c", _PEAK_RSS,
        sys.executable, "-m", "rmqdelay", "schedule", destination, "-", "--delay", "0s",
        "--content-type", "application/octet-stream",
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, argv, input=binary, capture_output=True, timeout=60,
        env=subprocess_env(settings),
    )  # fmt: skip
    assert done.returncode == RET_OK, done.stderr.decode()
    small_kib = int(done.stderr.decode().splitlines()[-1])
    task_id = done.stdout.decode().split()[1]  # "scheduled <id> for ..."
    recorder = Recorder()
    async with running_worker(settings, destination, recorder):
        await recorder.wait_for({task_id}, within=20)
    assert recorder.runs[0][0].body == binary
    # Over the size limit: refused having read no more than the limit (here 1,000 bytes of
    # 50 MB offered), in one line.
    small = {**subprocess_env(settings), "RMQDELAY_MAX_MESSAGE_SIZE": "1000"}
    done = await asyncio.to_thread(
        subprocess.run, argv, input=b"\0" * 50_000_000, capture_output=True, timeout=60,
        env=small,
    )  # fmt: skip
    assert done.returncode == RET_ERROR
    *lines, large_kib = done.stderr.decode().splitlines()
    assert lines == [
        "rmqdelay: error: the payload on stdin is over 1000 bytes (RMQDELAY_MAX_MESSAGE_SIZE); "
        "keep large data elsewhere and schedule a reference to it"
    ]
    # Reading all 50 MB first (as text, before) took over 100 MB more than a tiny payload.
    assert int(large_kib) < small_kib + 10_000, (small_kib, large_kib)


async def test_unknown_vhost_and_a_silent_port_are_one_line_each(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks AMQP
    port = listener.getsockname()[1]
    try:
        for url, expected in [
            (settings.url.rsplit("/", 1)[0] + "/no-such-vhost", "refused to open vhost"),
            (f"amqp://guest:guest@127.0.0.1:{port}/%2F", "did not complete the AMQP handshake"),
        ]:
            argv = ["--url", url, "--namespace", settings.namespace, "cancel", "k"]
            env = {"RMQDELAY_CONNECT_TIMEOUT": "2s"}
            done = await asyncio.to_thread(_rmqdelay, settings, *argv, **env)
            assert done.returncode == RET_ERROR
            assert done.stderr.count("\n") == 1, done.stderr
            assert expected in done.stderr
            assert "guest:guest" not in done.stderr
    finally:
        listener.close()


async def test_payloads_over_the_maximum_are_refused_before_or_by_the_broker(
    broker_url: str, settings: Settings, destination: str, caplog: pytest.LogCaptureFixture
) -> None:
    small = make_settings(broker_url, namespace=settings.namespace, max_message_size=1000)
    async with Scheduler(small) as scheduler:
        await scheduler.declare_destination(destination)
        with pytest.raises(InvalidPayloadError, match="1001 bytes is over the maximum"):
            await scheduler.schedule(destination, b"x" * 1001, delay=0, content_type="text/plain")
    # Settings larger than the broker's limit (128 MiB): the broker refuses, by closing the
    # channel; the error says so, and the next publish goes through at once.
    trusting = make_settings(broker_url, namespace=settings.namespace, max_message_size=2**29)
    async with Scheduler(trusting) as scheduler:
        with pytest.raises(InvalidPayloadError, match="larger than configured max size"):
            await scheduler.schedule(
                destination, b"x" * (129 * 2**20), delay=0, content_type="text/plain"
            )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rmqdelay.broker.scheduler"):
            await scheduler.schedule(destination, {"after": "refusal"}, delay=0)
        assert not [r for r in caplog.records if "publish failed" in r.message]


async def test_a_task_scheduled_in_the_past_is_warned_and_counted_apart(
    settings: Settings, destination: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        running_worker(settings, destination, Recorder()) as worker,
        Scheduler(settings) as scheduler,
    ):
        with caplog.at_level(logging.WARNING, logger="rmqdelay.broker.scheduler"):
            await scheduler.schedule(destination, {}, at=datetime.now(UTC) - timedelta(hours=2))
        assert any("is due 2h" in r.message for r in caplog.records)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.executed == 1)
    assert worker.stats.past_due == 1
    assert worker.stats.lateness_max_s < 60, "two hours in the past is not pipeline lateness"
    assert worker.metrics.past_due._value.get() == 1


async def test_cancelled_tasks_are_not_logged_one_by_one_at_info(
    settings: Settings, destination: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Scheduler(settings) as scheduler:
        await scheduler.declare_destination(destination)
        for _ in range(20):
            await scheduler.schedule(destination, {}, delay=0, keys=["告警"])
        await scheduler.cancel("告警")
    with caplog.at_level(logging.INFO, logger="rmqdelay"):
        async with running_worker(settings, destination, Recorder()) as worker:
            async with asyncio.timeout(10):
                await worker.wait_for(lambda s: s.cancelled == 20)
    assert not [r for r in caplog.records if "cancelled by" in r.message]
    assert "cancelled 20" in caplog.records[-1].message  # the summary says it


async def test_handler_modules_are_found_in_the_current_folder(
    settings: Settings, destination: str, tmp_path: Path
) -> None:
    (tmp_path / "mytasks.py").write_text(
        textwrap.dedent(
            """
            def on_task(task):
                print("mytasks ran", task.payload, flush=True)
            """
        )
    )
    env = {k: v for k, v in subprocess_env(settings).items() if k != "PYTHONPATH"}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", "consume", destination, "--handler", "mytasks:on_task",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert worker.stdout is not None
    assert worker.stderr is not None
    try:
        await _line_with(worker.stderr, "consuming", within=30)
        async with Scheduler(settings) as scheduler:
            await scheduler.schedule(destination, "hello", delay=0)
        line = await _line_with(worker.stdout, "mytasks ran", within=20)
        assert line.strip() == "mytasks ran hello"
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)


async def test_destroy_removes_a_namespace_but_not_while_workers_consume(
    broker_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed = make_settings(broker_url, max_delay="1h")
    need_management(doomed)  # it finds the work queue's consumer through the listing
    use_in_cli(monkeypatch, doomed)
    common = ["--url", doomed.url, "--namespace", doomed.namespace]
    try:
        async with Scheduler(doomed) as scheduler:
            await scheduler.declare_destination("d")
            await scheduler.schedule("d", {}, delay=timedelta(minutes=30))

        async def noop(task: Task) -> None:
            pass

        async with running_worker(doomed, "d", noop):
            code = await asyncio.to_thread(main, [*common, "destroy", "--yes"])
            assert code == RET_ERROR
            assert "workers are consuming" in capsys.readouterr().err
        code = await asyncio.to_thread(main, [*common, "destroy"])  # no terminal to confirm
        assert code == RET_ERROR
        assert "pass --yes" in capsys.readouterr().err
        assert await asyncio.to_thread(main, [*common, "destroy", "--yes"]) == RET_OK
        out = capsys.readouterr().out
        # the levels, parked, unroutable, a work queue and seven streams (cancels,
        # snapshots, series, journal, stats, and the parked and unroutable logs)
        assert f"deleted namespace {doomed.namespace!r}: {doomed.levels + 10} queue(s)" in out
        assert "holding " in out  # the task (and the stream's records, as counted so far)
        with pytest.raises(Exception, match="NOT_FOUND"):
            await depth(doomed, doomed.names.parked)
    finally:
        await apply_topology(doomed, build_topology(doomed.layout, ("d",)), delete=True)


async def test_status_says_when_it_read_and_agrees_with_parked(own_settings: Settings) -> None:
    settings, destination = own_settings, "dest"

    async def broken(task: Task) -> None:
        raise ValueError("no")

    from rmqdelay import RetryPolicy

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with (
        running_worker(settings, destination, broken, retry=once) as worker,
        Scheduler(settings) as scheduler,
    ):
        for _ in range(3):
            await scheduler.schedule(destination, {}, delay=0)
        async with asyncio.timeout(10):
            await worker.wait_for(lambda s: s.parked == 3)
    status = json.loads(_rmqdelay(settings, "status", "--json", destination).stdout)
    parked = _rmqdelay(settings, "parked")
    assert f"{status['parked']} parked in" in parked.stderr
    assert status["parked"] == 3
    read = datetime.fromisoformat(status["sampled_at"])
    assert abs((datetime.now(UTC) - read).total_seconds()) < 60
    if status["source"] == "management":
        assert any("samples counts every few seconds" in n for n in status["notes"])
        assert status["warnings"] == [], "this broker has file-handle headroom"
    text = _rmqdelay(settings, "status", destination).stdout
    assert f"read {status['sampled_at'][:10]}" in text


@pytest.mark.timeout(120)
async def test_an_outage_is_one_warning_per_link_and_one_line_when_back(
    own_settings: Settings,
) -> None:
    async with Proxy(own_settings.url) as proxy:
        settings = make_settings(proxy.url, namespace=own_settings.namespace, max_delay="1h")
        worker = await _worker(
            settings, "consume", "dest", "--handler", "tests.integration.handlers:report"
        )
        assert worker.stderr is not None
        lines: list[str] = []

        async def until(text: str, within: float) -> None:
            async with asyncio.timeout(within):
                while line := (await worker.stderr.readline()).decode():  # type: ignore[union-attr]
                    lines.append(line)
                    if text in line:
                        return
            raise AssertionError(f"no line with {text!r} in {lines}")

        try:
            await until("consuming", 30)
            start = len(lines)
            await proxy.down()
            await asyncio.sleep(10)  # the outage itself: a test of what ten seconds of it log
            await proxy.up()
            await until("reconnected", 60)
            await until("cancellation set caught up", 30)
        finally:
            worker.send_signal(signal.SIGTERM)
            rest = (await asyncio.wait_for(worker.communicate(), 30))[1].decode()
    during = lines[start:] + rest.splitlines(keepends=True)
    loud = [line for line in during if " WARNING " in line or " ERROR " in line]
    assert "Traceback" not in "".join(during)
    # One warning each: the worker's two connections (it consumes on one and publishes on
    # the other: a resource alarm blocks only a publishing one), the cancel follower's, and
    # the stats record that could not be written meanwhile.
    assert len(loud) <= 4, "".join(loud)
    assert any("reconnected" in line for line in during), "one line when it is back"
