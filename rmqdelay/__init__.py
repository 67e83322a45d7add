"""rmqdelay: delayed and scheduled tasks on RabbitMQ.

Publishers call :class:`Scheduler`; workers run :class:`Worker` (or ``rmqdelay consume``).
"""

from rmqdelay.errors import (
    BatchNotConfirmedError,
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
    InvalidTaskError,
    MessageDecodeError,
    PublishNotConfirmedError,
    RmqDelayError,
    TopologyMismatchError,
    UnroutableError,
    WebhookError,
)
from rmqdelay.retry import Retry, RetryPolicy
from rmqdelay.scheduler import Scheduler, TaskSpec
from rmqdelay.settings import Settings
from rmqdelay.task import Cancellation, Handler, ScheduledTask, Task
from rmqdelay.webhook import WebhookHandler
from rmqdelay.worker import Worker, WorkerStats

__version__ = "0.1.0"

__all__ = [
    "BatchNotConfirmedError",
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
    "InvalidTaskError",
    "MessageDecodeError",
    "PublishNotConfirmedError",
    "Retry",
    "RetryPolicy",
    "RmqDelayError",
    "ScheduledTask",
    "Scheduler",
    "Settings",
    "Task",
    "TaskSpec",
    "TopologyMismatchError",
    "UnroutableError",
    "WebhookError",
    "WebhookHandler",
    "Worker",
    "WorkerStats",
]
