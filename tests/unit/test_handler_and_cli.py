import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from rmqdelay import ConfigError, Task
from rmqdelay.cli.main import RET_ERROR, build_parser, main
from rmqdelay.worker.handler import is_async, load_handler, prepare

TASK = Task("i", "d", {}, datetime.now(UTC), datetime.now(UTC), 1, (), "application/json", {})


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nocolon", "package.module:function"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz' on the import path"),
        ("json:no_such_function", "has no"),
        ("json:__doc__", "not a callable"),
    ],
)
def test_load_handler_explains_failures(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_handler(spec)


def test_load_handler_finds_functions() -> None:
    assert load_handler("json:dumps") is __import__("json").dumps


async def test_plain_handlers_run_in_the_pool_and_async_ones_are_awaited() -> None:
    seen: list[str] = []

    def plain(task: Task) -> None:
        import threading

        seen.append(threading.current_thread().name)

    async def coro(task: Task) -> None:
        seen.append("async")

    class Callable:
        async def __call__(self, task: Task) -> None:
            seen.append("callable")

    assert not is_async(plain)
    assert is_async(coro)
    assert is_async(Callable())
    with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
        for handler in (plain, coro, Callable()):
            await prepare(handler, pool)(TASK)
    assert seen[0].startswith("pool")
    assert seen[1:] == ["async", "callable"]
    assert asyncio.get_running_loop()


def test_parser_knows_the_commands() -> None:
    args = build_parser().parse_args(["schedule", "alarms", '{"a":1}', "--delay", "30m"])
    assert (args.command, args.destination, args.delay) == ("schedule", "alarms", "30m")
    args = build_parser().parse_args(["consume", "alarms", "--handler", "m:f"])
    assert args.handler == "m:f"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["schedule", "alarms", "{}"])  # neither --delay nor --at


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["schedule", "alarms", "{not json", "--delay", "1s"], "not JSON"),
        (["schedule", "alarms", "{}", "--delay", "30"], "'30'"),
        (["schedule", "alarms", "{}", "--at", "tomorrow"], "'tomorrow'"),
        (["--namespace", "bad name", "declare"], "RMQDELAY_NAMESPACE"),
    ],
)
def test_cli_refuses_bad_input_before_connecting(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", "amqp://nobody@127.0.0.1:1/", *argv]) == RET_ERROR
    assert fragment in capsys.readouterr().err


def test_consume_takes_a_handler_or_a_webhook_not_both() -> None:
    parser = build_parser()
    assert parser.parse_args(["consume", "a", "--webhook", "http://h/x"]).webhook == "http://h/x"
    with pytest.raises(SystemExit):
        parser.parse_args(["consume", "a", "--webhook", "http://h/x", "--handler", "m:f"])
    with pytest.raises(SystemExit):
        parser.parse_args(["consume", "a"])


async def test_webhook_urls_must_be_http_and_are_never_echoed_with_credentials() -> None:
    from rmqdelay import WebhookHandler

    with pytest.raises(ConfigError, match="http") as info:
        WebhookHandler("ftp://user:s3cret@host/x")
    assert "s3cret" not in str(info.value)
    async with WebhookHandler("https://user:s3cret@host/x") as handler:
        assert handler.url.host == "host"
