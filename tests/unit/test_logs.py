import json
import logging

from rmqdelay.core.redact import Redactor
from rmqdelay.tools.logs import JsonFormatter, LinkNoise, TextFormatter, escape_controls


def test_json_logs_are_one_object_a_line_with_extras_and_exceptions() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "rmqdelay.worker.consume", logging.WARNING, __file__, 1, "task %s failed", ("t1",), exc_info
    )
    record.task_id = "t1"
    line = JsonFormatter().format(record)
    assert "\n" not in line.replace("\\n", "")
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "rmqdelay.worker.consume"
    assert entry["message"] == "task t1 failed"
    assert entry["task_id"] == "t1"
    assert "ValueError: bad" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def _record(name: str, level: int, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_user_data_cannot_forge_a_log_line_or_write_a_nul() -> None:
    forged = "k\n2026-12-04 10:00:00,000 ERROR rmqdelay.worker: forged\x00\u2028"
    line = TextFormatter(Redactor()).format(
        _record("rmqdelay.broker.cancels", logging.INFO, "cancelled %r", forged)
    )
    assert "\n" not in line
    assert "\x00" not in line
    assert "\u2028" not in line
    assert "\\n2026-12-04" in line
    assert "\\x00" in line
    assert escape_controls("plain text, tabs\tand all") == "plain text, tabs\\tand all"


def test_a_lost_links_library_noise_is_dropped_at_info_and_demoted_at_debug() -> None:
    noise = [
        _record("aiormq.connection", logging.ERROR, 'Unexpected connection close from remote "x"'),
        _record("aiormq.connection", logging.WARNING, "Cancelling cause reader exited abnormally"),
        _record("aiormq.connection", logging.ERROR, "error when creating transport: <refused>"),
        _record(
            "aio_pika.tools",
            logging.ERROR,
            "Callback <OneShotCallback: cb=x> error: RuntimeError: <Connection: 'amqp://h'> closed",
        ),
    ]
    other = _record("aio_pika.tools", logging.ERROR, "Callback <x> error: ValueError: a bug")
    ours = _record("rmqdelay.broker.connection", logging.WARNING, "connection to x lost")
    quiet, chatty = LinkNoise(show_below_warning=False), LinkNoise(show_below_warning=True)
    assert not any(quiet.filter(r) for r in noise)
    assert quiet.filter(other), "a library error that is not about the link stays"
    assert quiet.filter(ours)
    for record in noise:
        assert chatty.filter(record)
        assert record.levelno == logging.DEBUG
        assert record.exc_info is None
