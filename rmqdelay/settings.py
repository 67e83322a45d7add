"""Settings, read once at the edge (``RMQDELAY_*`` environment variables or ``.env``)."""

from __future__ import annotations

import functools
import math
import re
from datetime import timedelta
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from rmqdelay.core.delays import (
    BROKER_MAX_TTL_MS,
    DelayLimits,
    delay_to_us,
    describe_us,
    level_count,
    level_ttl_ms,
    parse_duration,
)
from rmqdelay.core.errors import ConfigError, InvalidDelayError
from rmqdelay.core.names import Names
from rmqdelay.core.redact import redact_url, split_urls, url_password, userinfo
from rmqdelay.core.retry import RetryPolicy
from rmqdelay.core.routes import Backend
from rmqdelay.core.topology import UNLIMITED_DELIVERIES, Layout
from rmqdelay.core.wiring import Wiring, wiring

ENV_PREFIX = "RMQDELAY_"
#: Task arrival rate (per second) a worker's default prefetch has room to hold early tasks
#: for: twice the 2,000/s one worker is meant to sustain.
HOLD_RATE_PER_S = 4000
#: The widest hold window: held tasks are unacked deliveries in a worker's memory, and
#: redelivered when it dies. (Beyond 16 s, a prefetch of 65,535 holds HOLD_RATE_PER_S of
#: arrivals no longer: wider windows suit lower rates only.)
MAX_HOLD_WINDOW = timedelta(seconds=60)
#: The journal keeper carries records at half the retention, passes apart (core.journal).
MIN_JOURNAL_RETENTION = timedelta(minutes=1)
#: The hold window unless set (or one unit, if that is longer). Chosen on RabbitMQ 4.3:
#: every hop it saves was about 0.5 ms of broker CPU, and 16 s put delays of 1-60 s at
#: 1.9x a raw publish+consume and delays under 16 s at 1.0-1.4x (docs/design.md,
#: "The cost of a task on 4.3").
DEFAULT_HOLD_WINDOW = timedelta(seconds=16)
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _duration(value: Any) -> Any:
    """Accept ``30s``/``3650d`` style strings besides what pydantic takes for a timedelta."""
    if isinstance(value, str) and value.strip() and not value.strip().startswith("P"):
        try:
            return parse_duration(value)
        except InvalidDelayError as e:
            raise ValueError(str(e)) from e
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


#: Characters that must be percent-encoded in the user name or password of a URL.
_RESERVED = {"@": "%40", "#": "%23", "/": "%2F", "?": "%3F", "[": "%5B", "]": "%5D"}
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _check_userinfo(url: str) -> None:
    found = userinfo(url)
    if found is None:
        return
    bad = sorted({c for c in found if c in _RESERVED})
    if bad or _BAD_ESCAPE.search(found):
        codes = ", ".join(f"{c!r} as {_RESERVED[c]}" for c in bad) or "'%' as %25"
        raise ValueError(
            "the user name or password holds characters a URL cannot carry as they are; "
            f"percent-encode them ({codes}; in Python: urllib.parse.quote(password, safe=''))"
        )


def _check_one_url(url: str) -> None:
    if not url.startswith(("amqp://", "amqps://")):
        raise ValueError("must start with amqp:// or amqps://")
    _check_userinfo(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(
            "is not a valid URL (a bracket or port that does not parse); the form is "
            "amqp://user:password@host:5672/vhost"
        ) from None
    if not parts.hostname:
        raise ValueError("names no host; the form is amqp://user:password@host:5672/vhost")


class Settings(BaseSettings):
    """Everything rmqdelay can be configured with; each field reads ``RMQDELAY_<FIELD>``.

    Invalid values raise :class:`rmqdelay.ConfigError` naming the variable.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    url: str = Field(
        default="amqp://guest:guest@localhost:5672/%2F",
        description="AMQP URL; its path names the vhost (%2F is '/'). On a cluster, the "
        "nodes' URLs separated by commas: clients fail over between them.",
    )
    namespace: str = Field(
        default="rmqdelay", description="Prefix of every broker object this deployment uses."
    )
    queue_type: Literal["quorum", "classic"] = Field(
        default="quorum", description="Type of every queue; quorum replicates and never loses."
    )
    resolution_ms: int = Field(
        # Measured side by side (docs/design.md, "Choosing the resolution"): with workers
        # holding early tasks, precision no longer depends on it; 1024 ms needs ~1 hop for
        # delays up to 5 s (2 at 256 ms, 4.4 at 10 ms) and the least broker CPU per task.
        default=1024,
        ge=1,
        le=3_600_000,
        description="Level unit: tasks reach workers up to this early; workers hold them.",
    )
    max_delay: Duration = Field(
        # Ten calendar years, leap days included: 29 levels at 1024 ms.
        default=timedelta(days=3653),
        description="Longest delay accepted (e.g. 3653d).",
    )
    hold_window: Duration | None = Field(
        default=None,
        description="How early the levels may deliver a task, for workers to hold until "
        "due: a wider window takes fewer hops, and workers hold more (at least the "
        "resolution, at most 60s; default: 16s, or one unit if that is longer).",
    )
    prefetch: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Unacked tasks per worker (default: the concurrency plus room to hold "
        "early tasks until they are due; see prefetch_for).",
    )
    concurrency: int = Field(default=16, ge=1, le=10_000, description="Handlers run at once.")
    declare: bool = Field(
        default=True, description="Declare the topology on start (false: ops import it)."
    )
    connect_timeout: Duration = Field(
        default=timedelta(seconds=30), description="How long to keep retrying the first connect."
    )
    heartbeat: Duration = Field(
        default=timedelta(seconds=5),
        description="AMQP heartbeat: a link that stays silent (a cut network) is given up "
        "after about 3.5 heartbeats and clients move to the next node (whole seconds; a "
        "URL's own ?heartbeat= wins).",
    )
    cancel_retention: Duration | None = Field(
        default=None,
        description="How long cancels are kept (default and minimum: max_delay).",
    )
    max_attempts: int = Field(
        default=5, ge=1, le=1000, description="Executions of a failing task before parking."
    )
    backoff_base: Duration = Field(
        default=timedelta(seconds=1), description="Backoff after the first failed attempt."
    )
    backoff_cap: Duration = Field(
        default=timedelta(hours=1), description="Longest backoff between attempts."
    )
    handler_timeout: Duration | None = Field(
        default=None, description="A handler running longer has failed (default: no limit)."
    )
    consumer_timeout: Duration = Field(
        default=timedelta(minutes=30),
        description="How long the broker lets a worker hold a task unacked (RabbitMQ's "
        "consumer timeout; set per consumer on 3.12+, else match the broker's "
        "consumer_timeout). A handler still running near it is stopped and its task retried.",
    )
    publish_deadline: Duration = Field(
        default=timedelta(seconds=30),
        description="How long schedule()/cancel() keep retrying through a broker outage.",
    )
    shutdown_grace: Duration = Field(
        default=timedelta(seconds=30), description="How long in-flight tasks may finish on stop."
    )
    backend: Literal["levels", "plugin", "auto"] = Field(
        default="levels",
        description="levels (TTL queues), plugin (x-delayed-message), or auto (plugin if the "
        "broker has it).",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Independent level sets; tasks spread across them by id, their leaders "
        "across the cluster's nodes, so more nodes carry more delayed tasks (levels backend).",
    )
    replicas: int = Field(
        default=3,
        ge=0,
        le=99,
        description="Members of each new quorum queue and of the cancel stream (capped at "
        "the cluster's size; 0: the broker's default). Applies when a queue is created.",
    )
    delivery_limit: int = Field(
        default=20,
        ge=1,
        le=UNLIMITED_DELIVERIES - 1,
        description="Deliveries of one task a quorum work queue allows before it parks the "
        "task (its workers kept dying or losing their link while they held it). Set as the "
        "work queues' x-delivery-limit on every RabbitMQ version; applies when a queue is "
        "created (a policy changes it later).",
    )
    journal: bool = Field(
        default=True,
        description="Copy every task into the journal stream as it enters the levels, so "
        "that pending tasks can be looked up, rescheduled, exported and transferred "
        "(false: none of that; schedule() is a little cheaper for the broker).",
    )
    journal_soon: bool = Field(
        default=False,
        description="Journal tasks due within the hold window too, so they are listed "
        "until they run; such a task then takes the schedule exchange instead of going "
        "straight to its work queue, which cost 27 to 47 percent of that path's schedule rate.",
    )
    journal_retention: Duration = Field(
        default=timedelta(days=7),
        description="How long the journal keeps each record (at least 1 minute, at most the "
        "cancel retention). Workers copy a still-pending task's record forward before it "
        "expires, so any delay stays listed. Its disk is the schedule rate times this "
        "times ~500 bytes. Applies when the stream is created.",
    )
    tls_ca_file: FilePath | None = Field(
        default=None, description="CA bundle to verify the broker with (amqps://)."
    )
    tls_cert_file: FilePath | None = Field(
        default=None, description="Client certificate (PEM) for amqps:// with mutual TLS."
    )
    tls_key_file: FilePath | None = Field(
        default=None, description="Private key of the client certificate (PEM)."
    )
    max_message_size: int = Field(
        default=134_217_728,
        ge=1,
        le=536_870_912,
        description="Largest task body in bytes; match the broker's max_message_size "
        "(RabbitMQ's default: 128 MiB).",
    )
    management_url: str | None = Field(
        default=None,
        description="Management API for 'rmqdelay status' (default: http://<host>:15672 "
        "for each host of RMQDELAY_URL); comma-separated URLs are tried in turn.",
    )

    http_token: SecretStr | None = Field(
        default=None,
        description="Bearer token 'rmqdelay serve' requires of every API call; it refuses "
        "to listen beyond loopback without one. The CLI sends it to RMQDELAY_API_URL.",
    )
    api_url: str | None = Field(
        default=None,
        description="A running 'rmqdelay serve' (http://host:port) that 'rmqdelay tasks' "
        "and 'rmqdelay reschedule' ask, answering from its followed journal in well under "
        "a second, instead of reading the whole journal themselves.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            # Not chained: pydantic's own text repeats every input, the URL's password too.
            raise ConfigError(_describe(e)) from None

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE.fullmatch(value):
            raise ValueError(
                "must be 1-64 characters of letters, digits, '_', '.', ':' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        urls = split_urls(value)
        if not urls:
            raise ValueError("is empty; the form is amqp://user:password@host:5672/vhost")
        for i, url in enumerate(urls):
            where = f"URL {i + 1} of {len(urls)} " if len(urls) > 1 else ""
            try:
                _check_one_url(url)
            except ValueError as e:
                raise ValueError(f"{where}{e}") from None
        if len({urlsplit(url).scheme for url in urls}) > 1:
            raise ValueError("mixes amqp:// and amqps://; the nodes of one cluster use one")
        if len({urlsplit(url).path or "/" for url in urls}) > 1:
            raise ValueError("names different vhosts; the nodes of one cluster share one")
        return value

    @field_validator(
        "max_delay",
        "connect_timeout",
        "shutdown_grace",
        "cancel_retention",
        "journal_retention",
        "backoff_base",
        "backoff_cap",
        "handler_timeout",
        "publish_deadline",
        "consumer_timeout",
    )
    @classmethod
    def _check_positive(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("must be positive")
        return value

    @field_validator("heartbeat")
    @classmethod
    def _check_heartbeat(cls, value: timedelta) -> timedelta:
        seconds = value.total_seconds()
        if seconds != int(seconds) or not 1 <= seconds <= 600:
            raise ValueError(
                f"must be whole seconds from 1s to 600s (AMQP counts heartbeats in seconds), "
                f"not {seconds:g}s"
            )
        return value

    @model_validator(mode="after")
    def _check_levels_fit(self) -> Settings:
        top = level_ttl_ms(self.levels - 1, self.resolution_ms)
        if top > BROKER_MAX_TTL_MS:
            raise ValueError(
                f"max_delay={self.max_delay} at resolution_ms={self.resolution_ms} needs a "
                f"level with a TTL of {top} ms; RabbitMQ allows at most {BROKER_MAX_TTL_MS} ms. "
                "Lower RMQDELAY_MAX_DELAY."
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "RMQDELAY_TLS_CERT_FILE and RMQDELAY_TLS_KEY_FILE go together: give both or neither"
            )
        if self.hold_window is not None and not (
            timedelta(milliseconds=self.resolution_ms) <= self.hold_window <= MAX_HOLD_WINDOW
        ):
            raise ValueError(
                f"hold_window={describe_us(delay_to_us(self.hold_window))} must be from the "
                f"resolution ({self.resolution_ms} ms: the levels cannot deliver a task any "
                f"closer to its due time) to {describe_us(delay_to_us(MAX_HOLD_WINDOW))} (held "
                "tasks are unacked deliveries in a worker's memory)"
            )
        if self.consumer_timeout <= 2 * timedelta(seconds=self.hold_window_s):
            raise ValueError(
                f"consumer_timeout={describe_us(delay_to_us(self.consumer_timeout))} must be "
                f"over twice the hold window ({self.hold_window_s:g}s): a worker holds a task "
                "unacked until it is due, and then needs time to run it"
            )
        if self.cancel_retention is not None and self.cancel_retention < self.max_delay:
            raise ValueError(
                f"cancel_retention={self.cancel_retention} is shorter than max_delay="
                f"{self.max_delay}: a cancel could be forgotten before the task it cancels is "
                "due. Raise RMQDELAY_CANCEL_RETENTION or lower RMQDELAY_MAX_DELAY."
            )
        if self.journal_retention < MIN_JOURNAL_RETENTION:
            raise ValueError(
                f"journal_retention={self.journal_retention} is under "
                f"{MIN_JOURNAL_RETENTION}: the journal keeper carries a record forward at half "
                "the retention, and needs the other half as a margin. Raise "
                "RMQDELAY_JOURNAL_RETENTION."
            )
        return self

    def prefetch_for(self, concurrency: int) -> int:
        """Unacked deliveries a worker asks for: the setting, or enough for ``concurrency``
        running handlers plus the early tasks it holds (unacked) until they are due.

        Tasks arrive up to the hold window early, so at HOLD_RATE_PER_S a worker holds
        up to ``HOLD_RATE_PER_S * hold window`` of them at once; with fewer deliveries
        allowed, held tasks would throttle the worker.
        """
        if self.prefetch is not None:
            return self.prefetch
        return min(65535, concurrency + math.ceil(HOLD_RATE_PER_S * self.hold_window_s))

    @property
    def window(self) -> timedelta:
        """How early the levels may deliver a task: the setting, or DEFAULT_HOLD_WINDOW
        (one unit when the resolution is coarser)."""
        if self.hold_window is not None:
            return self.hold_window
        return max(DEFAULT_HOLD_WINDOW, timedelta(milliseconds=self.resolution_ms))

    @property
    def hold_window_s(self) -> float:
        """``window`` in seconds."""
        return self.window.total_seconds()

    @property
    def retry_policy(self) -> RetryPolicy:
        """Attempts and backoff for tasks that do not set their own."""
        return RetryPolicy(
            self.max_attempts,
            _whole_ms(self.backoff_base),
            max(_whole_ms(self.backoff_base), _whole_ms(self.backoff_cap)),
        )

    @property
    def retention(self) -> timedelta:
        """How long cancels are kept: at least as long as any task can wait."""
        return self.cancel_retention or self.max_delay

    @property
    def levels(self) -> int:
        """Number of delay levels."""
        return self.limits.levels

    @property
    def layout(self) -> Layout:
        """The part of the settings that shapes the topology."""
        return Layout(
            self.namespace,
            self.queue_type,
            self.resolution_ms,
            self.levels,
            math.ceil(self.retention.total_seconds()),
            self.delay_backend,
            self.shards,
            self.replicas or None,
            self.delivery_limit,
            self.journal and self.delay_backend == "levels",
            math.ceil(min(self.journal_retention, self.retention).total_seconds()),
        )

    @property
    def limits(self) -> DelayLimits:
        """Delay arithmetic for these settings (computed once per resolution and maximum:
        every schedule() routes through it)."""
        return _limits(self.resolution_ms, self.max_delay, self.window)

    @property
    def wiring(self) -> Wiring:
        """Layout, names and limits as one frozen object, for clients to keep once their
        backend is resolved (computed once per layout)."""
        return wiring(self.layout, self.limits, self.max_message_size, self.journal_soon)

    @property
    def delay_backend(self) -> Backend:
        """The backend tasks go through. ``auto`` is resolved when a client connects
        (``declare.resolve_backend``); until then it stands for the levels, which every
        broker has."""
        return "plugin" if self.backend == "plugin" else "levels"

    @property
    def names(self) -> Names:
        """Broker object names for this namespace."""
        return Names(self.namespace)

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker's URLs: one, or one per cluster node, in the order given."""
        return tuple(split_urls(self.url))

    @property
    def safe_url(self) -> str:
        """The URL (or URLs) without passwords."""
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never be shown: the passwords of the broker and management URLs (as
        written and decoded) and the HTTP token."""
        found: list[str] = []
        for field in _URLS:
            for url in split_urls(getattr(self, field) or ""):
                if password := url_password(url):
                    found += [password, unquote(password)]
        if self.http_token is not None:
            found.append(self.http_token.get_secret_value())
        return tuple(dict.fromkeys(found))

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            yield key, (redact_url(value) if key in _URLS and value else value)


@functools.lru_cache(maxsize=64)
def _limits(resolution_ms: int, max_delay: timedelta, hold_window: timedelta) -> DelayLimits:
    max_delay_us = delay_to_us(max_delay)
    return DelayLimits(
        resolution_ms,
        level_count(resolution_ms, max_delay_us),
        max_delay_us,
        delay_to_us(hold_window),
    )


def _whole_ms(value: timedelta) -> int:
    return max(1, math.ceil(value / timedelta(milliseconds=1)))


#: Fields that may carry a password.
_URLS = ("url", "management_url")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        env = f"{ENV_PREFIX}{field.upper()}" if item["loc"] else "settings"
        shown = item.get("input")
        if field in _URLS and isinstance(shown, str):
            shown = redact_url(shown)
        got = f" (got {shown!r})" if item["loc"] and "input" in item else ""
        lines.append(f"{env}: {item['msg']}{got}")
    return "invalid settings: " + "; ".join(lines)
