"""Which HTTP status each rmqdelay error answers with."""

from __future__ import annotations

from rmqdelay.core.errors import (
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    InvalidPayloadError,
    InvalidQueryError,
    InvalidTaskError,
    JournalUnavailableError,
    PublishNotConfirmedError,
    RmqDelayError,
    TaskDueTooSoonError,
    TaskNotPendingError,
    UnroutableError,
)


def status_of(error: RmqDelayError) -> int:
    """The HTTP status an error answers with, on the API and on the dashboard's pages."""
    if isinstance(error, InvalidPayloadError) and "maximum message size" in str(error):
        return 413
    if isinstance(error, TaskDueTooSoonError | JournalUnavailableError):
        return 409
    if isinstance(error, UnroutableError | TaskNotPendingError):
        return 404
    if isinstance(error, InvalidTaskError | InvalidQueryError | ConfigError):
        return 422
    if isinstance(error, BrokerUnavailableError | PublishNotConfirmedError | BrokerError):
        return 503
    return 500
