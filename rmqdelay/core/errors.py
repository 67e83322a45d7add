"""Every exception rmqdelay raises on purpose.

    RmqDelayError
    ├── ConfigError (ValueError)            settings or CLI options that cannot work
    ├── InvalidQueryError (ValueError)      a find() filter, limit or cursor that cannot work
    ├── InvalidTaskError (ValueError)       a schedule() call refused before anything was sent
    │   ├── InvalidDelayError
    │   ├── InvalidDestinationError
    │   ├── InvalidKeyError
    │   └── InvalidPayloadError
    ├── BrokerError                         the broker said no, or could not be reached
    │   ├── BrokerUnavailableError (ConnectionError)
    │   │   └── BrokerBlockedError          a resource alarm (disk, memory) blocks publishing
    │   ├── TopologyMismatchError
    │   ├── UnroutableError
    │   ├── PublishNotConfirmedError
    │   │   └── BatchNotConfirmedError     some tasks of a schedule_many() were not confirmed
    │   ├── JournalUnavailableError        no journal to look tasks up in (turned off, plugin)
    │   └── ConsumerCancelledError         the broker cancelled a worker's consumer for good
    ├── TaskNotPendingError (LookupError)   no such pending task
    │   └── TaskDueTooSoonError             too close to its due time to move safely
    ├── MessageDecodeError                  a delivered message is not an rmqdelay task
    ├── WebhookError                        the webhook target failed a task (it is retried)
    ├── HandlerError (TypeError)            a handler returned what it must not (a coroutine)
    └── HandlerTimeoutError (TimeoutError)  a handler ran past the worker's handler timeout

Messages name the offending value and, where there is one, what to do about it.
Broker errors are always raised ``from`` the aio-pika/aiormq exception behind them.
"""

from __future__ import annotations

from typing import Any


class RmqDelayError(Exception):
    """Raised for every failure rmqdelay detects; catch this to catch them all."""


class ConfigError(RmqDelayError, ValueError):
    """Raised when settings or command-line options are invalid or inconsistent."""


class InvalidQueryError(RmqDelayError, ValueError):
    """Raised for a ``find()`` filter, limit or cursor that cannot work."""


class InvalidTaskError(RmqDelayError, ValueError):
    """Raised when a task is refused before anything is sent to the broker."""


class InvalidDelayError(InvalidTaskError):
    """Raised for a negative, non-finite or too long delay, or a bad ``at``/``delay`` pair."""


class InvalidDestinationError(InvalidTaskError):
    """Raised for an empty, over-long or otherwise unusable destination name."""


class InvalidKeyError(InvalidTaskError):
    """Raised for a cancel key that is empty, too long, not a string, or one too many."""


class InvalidPayloadError(InvalidTaskError):
    """Raised for a payload that is neither JSON-serialisable nor bytes with a content type."""


class InvalidRecurrenceError(InvalidTaskError):
    """Raised for a bad recurring rule: cron expression, interval, time zone, catch-up."""


class BrokerError(RmqDelayError):
    """Raised when the broker refused an operation or could not be reached."""


class BrokerUnavailableError(BrokerError, ConnectionError):
    """Raised when no connection to the broker could be made within the allowed attempts."""


class BrokerBlockedError(BrokerUnavailableError):
    """Raised when the broker blocked publishing (a disk or memory alarm) for longer than
    ``RMQDELAY_PUBLISH_DEADLINE``; ``alarm`` is RabbitMQ's reason ("low on disk"). ``sent``
    is true when the message went out before the broker said so: it may still be stored
    (and its task run) once the alarm clears."""

    def __init__(self, message: str, *, alarm: str, sent: bool = False) -> None:
        super().__init__(message)
        self.alarm = alarm
        self.sent = sent


class TopologyMismatchError(BrokerError):
    """Raised when a broker object exists with arguments other than the settings expect."""


class UnroutableError(BrokerError):
    """Raised when the broker could not route a task to its destination's work queue."""

    def __init__(self, message: str, *, destination: str) -> None:
        super().__init__(message)
        self.destination = destination


class PublishNotConfirmedError(BrokerError):
    """Raised when the broker nacked a publish or the channel closed before it confirmed."""


class ConsumerCancelledError(BrokerError):
    """Raised when the broker cancelled a worker's consumer (its queue was deleted) and the
    queue could not be declared again; the worker stops rather than idle unseen."""


class BatchNotConfirmedError(PublishNotConfirmedError):
    """Raised when some tasks of a ``schedule_many()`` batch were not confirmed.

    ``scheduled`` has the batch's order: a ScheduledTask for each confirmed task (it is
    safe in the broker), None for each that was not; ``errors`` maps those indexes to why.
    """

    def __init__(self, scheduled: list[Any], errors: dict[int, BaseException]) -> None:
        first = min(errors)
        super().__init__(
            f"{len(errors)} of {len(scheduled)} tasks were not confirmed (indexes "
            f"{sorted(errors)[:10]}{'...' if len(errors) > 10 else ''}; the first: "
            f"{type(errors[first]).__name__}: {errors[first]}); the others were"
        )
        self.scheduled = scheduled
        self.errors = errors


class JournalUnavailableError(BrokerError):
    """Raised when pending tasks cannot be looked up: the journal is turned off
    (RMQDELAY_JOURNAL=false), the plugin backend holds the tasks, or the stream is missing."""


class TaskNotPendingError(RmqDelayError, LookupError):
    """Raised when a task to show or reschedule is not pending: never scheduled, run or
    due already, or cancelled."""


class TaskDueTooSoonError(TaskNotPendingError):
    """Raised by ``reschedule()`` for a task due too soon to move: a worker may be running
    it already. It runs as scheduled."""


class MessageDecodeError(RmqDelayError):
    """Raised when a delivered message lacks or garbles the rmqdelay headers or body."""


class HandlerTimeoutError(RmqDelayError, TimeoutError):
    """Raised (and handled as a failed attempt) when a handler runs past its timeout."""


class WebhookError(RmqDelayError):
    """Raised (and handled as a failed attempt) when a webhook answers non-2xx or not at all."""


class HandlerError(RmqDelayError, TypeError):
    """Raised (and handled as a failed attempt) when a handler returns what it must not,
    such as a coroutine from a plain ``def`` handler."""
