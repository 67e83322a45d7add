import json
import logging

from rmqdelay.tools.logs import JsonFormatter


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
