"""rmqdelay: delayed and scheduled tasks on RabbitMQ.

Publishers call :class:`Scheduler`; workers run :class:`Worker` (or ``rmqdelay consume``).
"""

from rmqdelay.errors import (
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
from rmqdelay.scheduler import Scheduler
from rmqdelay.settings import Settings
from rmqdelay.task import Cancellation, Handler, ScheduledTask, Task
from rmqdelay.webhook import WebhookHandler
from rmqdelay.worker import Worker, WorkerStats

__version__ = "0.1.0"

__all__ = [
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
    "TopologyMismatchError",
    "UnroutableError",
    "WebhookError",
    "WebhookHandler",
    "Worker",
    "WorkerStats",
]
