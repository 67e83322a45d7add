"""Hardening without a broker: secrets, log levels, failure descriptions, one-line errors."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import rmqdelay
from rmqdelay import (
    BrokerUnavailableError,
    ConfigError,
    HandlerError,
    InvalidKeyError,
    InvalidPayloadError,
    Settings,
    Task,
    WebhookError,
    Worker,
)
from rmqdelay.cli.main import RET_ERROR, RET_OK, main
from rmqdelay.core.redact import (
    Redactor,
    redact_url,
    redact_urls,
    safe_webhook_url,
    webhook_secrets,
)
from rmqdelay.core.wire import check_key, check_keys, check_size, decode_task, encode_payload
from rmqdelay.tools.logs import THIRD_PARTY, TRACE, JsonFormatter, TextFormatter, configure_logging
from rmqdelay.tools.status import headroom_warnings
from rmqdelay.tools.webhook import WebhookHandler
from rmqdelay.worker.handler import describe_failure, prepare
from rmqdelay.worker.threads import DaemonThreadPool

HOOK = "https://robot:hunter2pw@hooks.example.com/send/TOKENabc123?access_token=QUERYsecret9"
HOOK_SECRETS = ("hunter2pw", "TOKENabc123", "QUERYsecret9")
TASK = Task("i", "d", {}, datetime.now(UTC), datetime.now(UTC), 1, (), "application/json", {})


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *THIRD_PARTY)}
    handlers = list(root.handlers)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    root.handlers[:] = handlers


def test_webhook_urls_show_only_scheme_host_and_port() -> None:
    assert safe_webhook_url(HOOK) == "https://hooks.example.com/..."
    assert safe_webhook_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert safe_webhook_url("http://[bad") == "(a webhook URL that does not parse)"


def test_every_secret_part_of_a_webhook_url_is_masked_in_any_text() -> None:
    redact = Redactor(webhook_secrets(HOOK))
    text = f"POST {HOOK} failed; path /send/TOKENabc123, query access_token=QUERYsecret9"
    masked = redact(text)
    for secret in HOOK_SECRETS:
        assert secret not in masked
    assert "failed; path" in masked


def test_short_strings_are_not_treated_as_secrets() -> None:
    assert Redactor(["pw", "/"])("a pw at /x") == "a pw at /x"


async def test_webhook_errors_never_carry_the_url_secrets() -> None:
    async with WebhookHandler(HOOK.replace("hooks.example.com", "127.0.0.1:9")) as hook:
        with pytest.raises(WebhookError) as info:
            await hook(TASK)
    assert info.value.__cause__ is None, "httpx's exception holds the request URL"
    for secret in HOOK_SECRETS:
        assert secret not in str(info.value)
    assert "https://127.0.0.1:9/..." in str(info.value)


@pytest.mark.parametrize(
    ("level", "own", "libraries"),
    [
        ("INFO", logging.INFO, logging.WARNING),
        ("DEBUG", logging.DEBUG, logging.INFO),  # no AMQP frame dumps at DEBUG
        ("TRACE", TRACE, logging.DEBUG),
        ("ERROR", logging.ERROR, logging.ERROR),
    ],
)
def test_third_party_loggers_stay_quiet_unless_asked(
    restore_logging: None, level: str, own: int, libraries: int
) -> None:
    configure_logging(level, "text")  # type: ignore[arg-type]
    assert logging.getLogger().level == own
    for name in ("aiormq", "aio_pika", "httpx"):
        assert logging.getLogger(name).level == libraries, name


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_log_lines_mask_secrets_in_messages_and_tracebacks(formatter: type) -> None:
    redact = Redactor([*webhook_secrets(HOOK), "brokerPW99"])
    try:
        raise ValueError(f"boom at {HOOK} with brokerPW99")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "httpx", logging.INFO, __file__, 1, 'HTTP Request: POST %s "%s"', (HOOK, "200"), exc_info
    )
    line = formatter(redact).format(record)
    for secret in (*HOOK_SECRETS, "brokerPW99"):
        assert secret not in line
    if formatter is JsonFormatter:
        assert json.loads(line)["message"].startswith("HTTP Request: POST ******")


@pytest.mark.parametrize(
    ("error", "name", "fragment"),
    [
        (SystemExit(3), "SystemExit", "SystemExit(3)"),
        (SystemExit(0), "SystemExit", "SystemExit(0)"),
        (KeyboardInterrupt(), "KeyboardInterrupt", "cannot stop the worker"),
        (asyncio.CancelledError(), "CancelledError", "without being cancelled"),
        (ValueError("x" * 5000), "ValueError", "x" * 900),
    ],
)
def test_failures_are_described_by_type_and_reason(
    error: BaseException, name: str, fragment: str
) -> None:
    got_name, detail = describe_failure(error)
    assert got_name == name
    assert fragment in detail
    assert len(detail) <= 1000


def test_an_exception_whose_str_raises_is_still_described() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert describe_failure(Odd()) == ("Odd", "(str() of the Odd failed)")


async def test_a_plain_handler_returning_a_coroutine_fails_without_running_it() -> None:
    ran = []

    async def later(task: Task) -> None:  # pragma: no cover - must never run
        ran.append(task)

    def plain(task: Task) -> object:
        return later(task)

    pool = DaemonThreadPool(1)
    with pytest.raises(HandlerError, match="make the handler 'async def'"):
        await prepare(plain, pool)(TASK)
    pool.shutdown()
    assert ran == []


def test_a_stuck_pool_thread_does_not_hold_the_process_open() -> None:
    script = textwrap.dedent(
        """
        import threading
        from rmqdelay.worker.threads import DaemonThreadPool
        pool = DaemonThreadPool(2)
        pool.submit(threading.Event().wait)
        print(pool.submit(sum, [1, 2]).result(), flush=True)
        pool.shutdown(wait=False, cancel_futures=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"


def test_keys_must_be_a_list_and_ids_are_named_as_ids() -> None:
    with pytest.raises(InvalidKeyError, match="keys must be a list of strings, got NoneType"):
        check_keys(None)
    with pytest.raises(InvalidKeyError, match="a task id must be a non-empty string"):
        check_key("", "a task id")
    assert check_keys(["告警", "incident:42"]) == ("告警", "incident:42")


def test_deeply_nested_payloads_are_refused_both_ways() -> None:
    deep: object = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidPayloadError, match="nested too deeply"):
        encode_payload(deep, None)
    body = b"[" * 100_000 + b"]" * 100_000
    from rmqdelay import MessageDecodeError

    with pytest.raises(MessageDecodeError, match="nested too deeply"):
        decode_task(headers={}, body=body, content_type="application/json", routing_key="d")


def test_payloads_over_the_broker_maximum_are_refused_before_sending() -> None:
    check_size(b"x" * 100, 100)
    with pytest.raises(InvalidPayloadError, match=r"101 bytes is over the maximum .* 100 bytes"):
        check_size(b"x" * 101, 100)


def test_low_broker_headroom_is_warned_about() -> None:
    ok = {
        "name": "rabbit@a",
        "fd_used": 100,
        "fd_total": 20000,
        "proc_used": 10,
        "proc_total": 1000,
    }
    assert headroom_warnings([ok]) == []
    low = {**ok, "fd_used": 900, "fd_total": 1024, "proc_used": 900}
    warnings = headroom_warnings([low])
    assert "900 of 1024 file handles in use (124 left, about 1 more namespace(s))" in warnings[0]
    assert "900 of 1000 Erlang processes" in warnings[1]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["schedule", "d", "{}", "--delay", ""], "empty duration"),
        (["schedule", "d", "{}", "--delay", "10ms5s"], "largest to smallest"),
        (["schedule", "d", "{}", "--delay", "1s", "--id", ""], "a task id must be"),
        (["schedule", "café", "{}", "--delay", "1s"], "may hold only letters"),
        (["schedule", "d", "[" * 50_000 + "]" * 50_000, "--delay", "1s"], "nested too deeply"),
        (["schedule", "d", "{}", "--delay", "99999d"], "exceeds the maximum of 3653d"),
        # a leading '-' reaches the check instead of argparse's "expected one argument"
        (["schedule", "d", "{}", "--delay", "-5s"], "delay must not be negative, got -5s"),
        (["recurring", "add", "d", "{}", "--every", "500ms", "--key", "k"], "every=500ms"),
        (["recurring", "add", "d", "{}", "--cron", "0 8 * * *", "--tz", "", "--key", "k"], "''"),
        (["recurring", "add", "d", "{}", "--cron", "* * * * * *", "--key", "k"], "6 fields"),
        (["--url", "amqp://u:p[ss@localhost/", "cancel", "k"], "percent-encode"),
    ],
)
def test_operator_mistakes_are_one_line_naming_the_problem(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    assert main(argv) == RET_ERROR
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("rmqdelay: error: ")
    assert fragment in captured.err
    assert "p[ss" not in captured.err
    assert "us " not in captured.err  # durations in human units


def test_version_is_the_one_in_pyproject(capsys: pytest.CaptureFixture[str]) -> None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rmqdelay {version}"
    assert rmqdelay.__version__ == version


def test_definitions_take_the_vhost_from_the_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    monkeypatch.setenv("RMQDELAY_URL", "amqp://u:pw@broker:5672/prod")
    assert main(["definitions", "--max-delay", "1h"]) == RET_OK
    document = json.loads(capsys.readouterr().out)
    assert document["vhosts"] == [{"name": "prod"}]
    assert main(["definitions", "--max-delay", "1h", "--vhost", "other"]) == RET_OK
    assert json.loads(capsys.readouterr().out)["vhosts"] == [{"name": "other"}]


def test_an_unencoded_password_never_reaches_a_log_or_error(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    url = "amqp://guest:se@cr#et[pw@localhost:1/"
    assert main(["--url", url, "--log-level", "DEBUG", "cancel", "k"]) == RET_ERROR
    captured = capsys.readouterr()
    assert "cr#et" not in captured.err + captured.out
    assert redact_url(url) == "amqp://guest:******@localhost:1/"


def test_retry_delay_of_a_timedelta_is_described_in_human_units() -> None:
    from rmqdelay.core.delays import DelayLimits, delay_to_us

    limits = DelayLimits(10, 35, delay_to_us(timedelta(days=3653)))
    with pytest.raises(Exception, match=r"26336d3h18m26\.776s exceeds the maximum of 3653d"):
        limits.units(2_275_442_306_775_524)


def test_a_partly_confirmed_batch_says_which_tasks_are_safe() -> None:
    from rmqdelay import BatchNotConfirmedError, PublishNotConfirmedError

    error = BatchNotConfirmedError(["s0", None, "s2"], {1: PublishNotConfirmedError("nacked")})
    assert str(error).startswith("1 of 3 tasks were not confirmed (indexes [1]; the first: ")
    assert "PublishNotConfirmedError: nacked" in str(error)
    assert error.scheduled == ["s0", None, "s2"]
    assert isinstance(error, PublishNotConfirmedError)


def test_a_queue_whose_node_is_starting_is_told_apart_from_a_missing_one() -> None:
    from aiormq.exceptions import ChannelNotFoundEntity

    from rmqdelay.broker.connection import queue_starting

    starting = ChannelNotFoundEntity(
        "NOT_FOUND - home node 'rabbit@vm' of durable queue 'ns.cancels' in vhost '/' is down "
        "or inaccessible"
    )
    missing = ChannelNotFoundEntity("NOT_FOUND - no queue 'ns.cancels' in vhost '/'")
    assert queue_starting(starting)
    assert not queue_starting(missing)
    assert not queue_starting(ValueError("down or inaccessible"))


def test_a_stream_replica_catching_up_after_a_restart_is_transient() -> None:
    """Seen in a rolling restart: a worker's cancellation follower, on a node whose stream
    replica was not back yet, was refused and the worker stopped."""
    from aiormq.exceptions import ChannelPreconditionFailed

    from rmqdelay.broker.connection import queue_starting

    catching_up = ChannelPreconditionFailed(
        "PRECONDITION_FAILED - queue 'queue 'ns.cancels' in vhost '/'' does not have a "
        "replica on the local node"
    )
    other = ChannelPreconditionFailed("PRECONDITION_FAILED - inequivalent arg 'x-max-age'")
    assert queue_starting(catching_up)
    assert not queue_starting(other)


def test_a_stream_read_waits_for_the_replica_a_node_loss_restarts_and_no_longer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen in CI: a lookup through a survivor right after the journal's leader died was
    refused ("does not have a running replica on the local node"); the read is retried
    until the replica runs, and a refusal that outlasts the wait names the stream."""
    from aiormq.exceptions import ChannelPreconditionFailed

    from rmqdelay.broker import streams

    monkeypatch.setattr(streams, "REPLICA_RETRY_S", 0.01)
    refused = ChannelPreconditionFailed(
        "PRECONDITION_FAILED - stream queue 'ns.journal' in vhost '/' does not have a running "
        "replica on the local node"
    )
    attempts: list[int] = []

    async def read(fail_times: int) -> str:
        attempts.append(1)
        if len(attempts) <= fail_times:
            raise refused
        return "read"

    assert asyncio.run(streams.when_replica_runs("ns.journal", lambda: read(3))) == "read"
    assert len(attempts) == 4

    monkeypatch.setattr(streams, "REPLICA_WAIT_S", 0.05)
    with pytest.raises(BrokerUnavailableError, match=r"'ns\.journal' has had no running replica"):
        asyncio.run(streams.when_replica_runs("ns.journal", lambda: read(10**6)))

    other = ChannelPreconditionFailed("PRECONDITION_FAILED - inequivalent arg 'x-max-age'")

    async def fails() -> str:
        raise other

    with pytest.raises(ChannelPreconditionFailed, match="inequivalent"):
        asyncio.run(streams.when_replica_runs("ns.journal", fails))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://bot:pw123456@api.example.com/v1", "https://bot:******@api.example.com/..."),
        ("see https://hooks.example.com/services/T0/B0/XYZ.", "see https://hooks.example.com/..."),
        ("GET http://api.example.com/send?key=abc fails", "GET http://api.example.com/... fails"),
        ("https://TOKEN123@api.example.com/", "https://******@api.example.com"),
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:******@localhost:5672/%2F"),
        ("http://localhost:15672", "http://localhost:15672"),
        ("(at https://[::1]:8080/x?y)", "(at https://[::1]:8080/...)"),
        ("no URL here", "no URL here"),
    ],
)
def test_any_url_in_text_loses_its_credentials_path_and_query(text: str, shown: str) -> None:
    assert redact_urls(text) == shown
    assert Redactor()(text) == shown, "the same rules wherever text is shown"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["consume", "d", "--handler", "m:f", "--prefetch", "-1"], "--prefetch: must be from 1"),
        (["consume", "d", "--handler", "m:f", "--concurrency", "0"], "--concurrency: must be from"),
        (["consume", "d", "--handler", "m:f", "--metrics-port", "99999"], "from 0 to 65535"),
        (["consume", "d", "--handler", "m:f", "--max-attempts", "x"], "'x' is not a whole number"),
    ],
)
def test_out_of_range_numbers_are_refused_by_the_parser_in_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"concurrency": 0}, "concurrency must be a whole number from 1"),
        ({"prefetch": -1}, "prefetch must be"),
        ({"metrics_port": 99999}, "metrics_port must be"),
        ({"concurrency": True}, "concurrency must be"),
    ],
)
def test_a_worker_refuses_arguments_out_of_range(kwargs: dict[str, object], fragment: str) -> None:
    async def handler(task: object) -> None:
        pass

    with pytest.raises(ConfigError, match=fragment):
        Worker(Settings(_env_file=None), "d", handler, **kwargs)  # type: ignore[arg-type]
