"""Log configuration for the command line: plain text, or one JSON object a line.

The library itself never configures logging; only ``rmqdelay`` (cli.py) calls this.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

from rmqdelay.core.redact import Redactor

LogFormat = Literal["text", "json"]
LogLevel = Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"]
LOG_LEVELS: tuple[LogLevel, ...] = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")
#: Below DEBUG: the libraries' own debug output, AMQP frames with payloads included.
TRACE = 5
#: Libraries whose INFO and DEBUG lines are noise (or secrets: httpx logs every URL it
#: calls) to an operator: WARNING and up unless asked for more.
THIRD_PARTY = ("aio_pika", "aiormq", "pamqp", "httpx", "httpcore", "asyncio")
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


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, with known secrets masked (traceback included)."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if _CONTROL.search(message):
            # User data (a key, an id, a request path) must not start a line of its own
            # or write a NUL: one record, one line. Tracebacks keep their lines.
            record = logging.makeLogRecord(
                {**record.__dict__, "msg": escape_controls(message), "args": None}
            )
        return self.redact(super().format(record))


#: Control characters (C0, DEL, C1) and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with each control character written as its escape (``\\n``, ``\\x00``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...extra, "exception"?}`` on one line, with
    known secrets masked in every value."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__()
        self.redact = redact if redact is not None else Redactor()

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
        return json.dumps(
            {k: self.redact(v) if isinstance(v, str) else v for k, v in entry.items()},
            default=lambda value: self.redact(str(value)),
        )


#: What aiormq and aio-pika say, at WARNING or ERROR and often with a traceback, each time
#: a link drops or a reconnect attempt fails. rmqdelay says it once an outage (the link
#: lost, then back): these go to debug, where they are shown at DEBUG and TRACE only.
_LINK_NOISE = re.compile(
    "Unexpected connection close|reader exited abnormally|error when creating transport|"
    "Connection attempt .* failed|Callback <OneShotCallback.*(closed|Connection)|"
    "Server connection .* was stuck|cancelled by the broker on <Channel"
)


class LinkNoise(logging.Filter):
    """Demotes the libraries' lines about a lost link to DEBUG, without their traceback,
    and keeps them only when rmqdelay's level shows the libraries' INFO (``--log-level
    DEBUG`` and below)."""

    def __init__(self, show_below_warning: bool) -> None:
        super().__init__()
        self._show = show_below_warning

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(("aiormq", "aio_pika")):
            return True
        if not _LINK_NOISE.search(record.getMessage()):
            return True
        if not self._show:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


def configure_logging(level: LogLevel, fmt: LogFormat, redact: Redactor | None = None) -> None:
    """Send logs to stderr in ``fmt``, masking what ``redact`` knows of.

    ``level`` is rmqdelay's own; the libraries in THIRD_PARTY stay at WARNING, go to INFO
    at DEBUG, and show their own debug output (AMQP frames, payloads) only at TRACE.
    """
    redact = redact if redact is not None else Redactor()
    handler = _Stderr()
    handler.set_name("rmqdelay")
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    logging.addLevelName(TRACE, "TRACE")
    own = TRACE if level == "TRACE" else logging.getLevelName(level)
    libraries = {"TRACE": logging.DEBUG, "DEBUG": logging.INFO}.get(level, logging.WARNING)
    handler.addFilter(LinkNoise(show_below_warning=libraries < logging.WARNING))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "rmqdelay"]:
        root.removeHandler(old)  # ours from an earlier call; others are not ours to touch
    root.addHandler(handler)
    root.setLevel(own)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(max(libraries, own))
