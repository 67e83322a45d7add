"""Log configuration for the command line: plain text, or one JSON object a line.

The library itself never configures logging; only ``rmqdelay`` (cli.py) calls this.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Stderr(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at emit time, not the one at creation (which a
    test runner, or a daemoniser, may have closed since)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...extra, "exception"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: LogFormat) -> None:
    """Send rmqdelay's (and aio-pika's) logs to stderr in ``fmt``."""
    handler = _Stderr()
    handler.set_name("rmqdelay")
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "rmqdelay"]:
        root.removeHandler(old)  # ours from an earlier call; others are not ours to touch
    root.addHandler(handler)
    root.setLevel(level)
