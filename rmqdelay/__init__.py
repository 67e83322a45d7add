"""rmqdelay: delayed and scheduled tasks on RabbitMQ.

Publishers call :class:`Scheduler` (:class:`SyncScheduler` from synchronous code); workers
run :class:`Worker` (or ``rmqdelay consume``).
"""

from importlib import metadata as _metadata

from rmqdelay.broker.scheduler import Scheduler, TaskSpec
from rmqdelay.broker.sync import SyncScheduler
from rmqdelay.core.errors import (
    BatchNotConfirmedError,
    BrokerBlockedError,
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    ConsumerCancelledError,
    HandlerError,
    HandlerTimeoutError,
    InvalidDelayError,
    InvalidDestinationError,
    InvalidKeyError,
    InvalidPayloadError,
    InvalidQueryError,
    InvalidRecurrenceError,
    InvalidTaskError,
    JournalUnavailableError,
    MessageDecodeError,
    PublishNotConfirmedError,
    RmqDelayError,
    TaskDueTooSoonError,
    TaskNotPendingError,
    TopologyMismatchError,
    UnroutableError,
    WebhookError,
)
from rmqdelay.core.recurrence import Series
from rmqdelay.core.retry import Retry, RetryPolicy
from rmqdelay.core.task import (
    Cancellation,
    Handler,
    PendingTask,
    ScheduledTask,
    Task,
    TaskPage,
)
from rmqdelay.settings import Settings
from rmqdelay.tools.pending import Pending, pending
from rmqdelay.tools.webhook import WebhookHandler
from rmqdelay.worker.consume import Worker
from rmqdelay.worker.stats import WorkerStats

__version__ = _metadata.version("rmqdelay")  # one source: pyproject.toml

__all__ = [
    "BatchNotConfirmedError",
    "BrokerBlockedError",
    "BrokerError",
    "BrokerUnavailableError",
    "Cancellation",
    "ConfigError",
    "ConsumerCancelledError",
    "Handler",
    "HandlerError",
    "HandlerTimeoutError",
    "InvalidDelayError",
    "InvalidDestinationError",
    "InvalidKeyError",
    "InvalidPayloadError",
    "InvalidQueryError",
    "InvalidRecurrenceError",
    "InvalidTaskError",
    "JournalUnavailableError",
    "MessageDecodeError",
    "Pending",
    "PendingTask",
    "PublishNotConfirmedError",
    "Retry",
    "RetryPolicy",
    "RmqDelayError",
    "ScheduledTask",
    "Scheduler",
    "Series",
    "Settings",
    "SyncScheduler",
    "Task",
    "TaskDueTooSoonError",
    "TaskNotPendingError",
    "TaskPage",
    "TaskSpec",
    "TopologyMismatchError",
    "UnroutableError",
    "WebhookError",
    "WebhookHandler",
    "Worker",
    "WorkerStats",
    "pending",
]
