"""The rmqdelay command against a real broker."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from rmqdelay import Settings
from rmqdelay.cli.demo import DESTINATION, run_demo
from rmqdelay.cli.main import RET_ERROR, RET_OK, main
from rmqdelay.core.topology import destination_topology

from .conftest import apply
from .helpers import Recorder, depth, running_worker, subprocess_env, use_in_cli

pytestmark = pytest.mark.integration


async def _line_with(stream: asyncio.StreamReader, text: str, within: float) -> str:
    async with asyncio.timeout(within):
        while line := (await stream.readline()).decode():
            if text in line:
                return line
    raise AssertionError(f"stream ended without a line containing {text!r}")


async def test_consume_executes_and_stops_cleanly_on_sigterm(
    settings: Settings, destination: str
) -> None:
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rmqdelay", "consume", destination,
        "--handler", "tests.integration.handlers:report",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(settings),
    )  # fmt: skip
    assert worker.stdout is not None
    assert worker.stderr is not None
    try:
        await _line_with(worker.stderr, "consuming", within=30)
        scheduled = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rmqdelay", "schedule", destination, '{"n": 7}',
            "--delay", "300ms", "--id", "cli-task-1",
            stdout=asyncio.subprocess.PIPE, env=subprocess_env(settings),
        )  # fmt: skip
        out, _ = await asyncio.wait_for(scheduled.communicate(), timeout=30)
        assert scheduled.returncode == RET_OK
        assert out.decode().startswith("scheduled cli-task-1")
        line = await _line_with(worker.stdout, "executed", within=10)
        assert line.strip() == "executed cli-task-1 {'n': 7}"
        worker.send_signal(signal.SIGTERM)
        await _line_with(worker.stderr, "stopped: executed 1", within=20)
        assert await asyncio.wait_for(worker.wait(), timeout=20) == RET_OK
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


def test_declare_creates_work_queues_and_schedule_reports_errors(
    settings: Settings,
    destination: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_in_cli(monkeypatch, settings)
    common = ["--url", settings.url, "--namespace", settings.namespace]
    assert main([*common, "declare", destination]) == RET_OK
    assert f"destinations {destination}" in capsys.readouterr().out
    assert asyncio.run(depth(settings, settings.names.work_queue(destination))) == 0
    assert main([*common, "schedule", "no-such-dest", "{}", "--delay", "1s"]) == RET_ERROR
    err = capsys.readouterr().err
    assert "'no-such-dest' has no work queue" in err
    assert "guest:guest" not in err
    code = main([*common, "schedule", destination, "{}", "--at", "2030-01-01T00:00:00"])
    assert code == RET_ERROR
    assert "naive" in capsys.readouterr().err


async def test_demo_runs_and_reports_every_task_on_time(settings: Settings) -> None:
    lines: list[str] = []
    try:
        assert await run_demo(settings, lines.append) == 0
    finally:
        await apply(settings, destination_topology(settings.layout, DESTINATION), delete=True)
    assert lines[-1].startswith("summary: 10/10 executed, 0 early, 2 cancelled and skipped, 0 ran")
    ran = [line for line in lines if line.lstrip().startswith("ran ")]
    assert len(ran) == 10
    assert not any("incident 7" in line or "first time" in line for line in ran)


def test_cli_cancel_and_replace_take_effect(
    settings: Settings,
    destination: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_in_cli(monkeypatch, settings)
    common = ["--url", settings.url, "--namespace", settings.namespace]
    schedule = [*common, "schedule", destination, "--delay", "300ms"]
    assert main([*common, "declare", destination]) == RET_OK
    assert main([*schedule, '"cancel me"', "--key", "cli:a", "--key", "cli:x"]) == RET_OK
    assert main([*schedule, '"old"', "--key", "cli:b"]) == RET_OK
    assert main([*schedule, '"new"', "--key", "cli:b", "--replace"]) == RET_OK
    assert main([*common, "cancel", "cli:a"]) == RET_OK
    out = capsys.readouterr().out
    assert "under cli:a, cli:x" in out
    assert "(earlier tasks under them cancelled)" in out
    assert "cancelled 'cli:a' at " in out

    async def run_worker() -> tuple[list[object], int]:
        recorder = Recorder()
        async with running_worker(settings, destination, recorder) as worker:
            async with asyncio.timeout(10):
                await worker.wait_for(lambda s: s.executed == 1 and s.cancelled == 2)
        return [task.payload for task, _ in recorder.runs], worker.stats.cancelled

    assert asyncio.run(run_worker()) == (["new"], 2)


async def test_control_characters_in_ids_and_keys_are_escaped_in_what_the_cli_prints(
    own_settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An id or key is anyone's text: printed raw, an escape sequence would rewrite the
    operator's terminal and a newline forge a line of output."""
    # A namespace of its own: the task waits in a level, and leaves with the namespace.
    settings, destination = own_settings, "dest"
    use_in_cli(monkeypatch, settings)
    common = ["--url", settings.url, "--namespace", settings.namespace]
    assert await asyncio.to_thread(main, [*common, "declare", destination]) == RET_OK
    capsys.readouterr()
    evil_id, evil_key = "id\x1b[2J\nscheduled forged", "key\u2028\x00x"
    schedule = [*common, "schedule", destination, "{}", "--delay", "1h"]
    assert await asyncio.to_thread(main, [*schedule, "--id", evil_id, "--key", evil_key]) == RET_OK
    assert await asyncio.to_thread(main, [*common, "cancel", evil_key]) == RET_OK
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2, out
    for raw in ("\x1b", "\x00", "\u2028"):
        assert raw not in out
    assert "id\\x1b[2J\\nscheduled forged" in out
    assert "key\\u2028\\x00x" in out
