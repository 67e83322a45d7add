"""Traces across the delay (the ``rmqdelay[otel]`` extra): W3C trace context in the task.

``schedule()`` publishes inside a *schedule* span (PRODUCER) and writes its context into
the message's ``traceparent`` and ``tracestate`` headers, as OpenTelemetry's messaging
instrumentations do. Those are ordinary headers: dead-lettering through the levels keeps
them, a retry or a journal carry copies them, a forwarder passes them on, so every attempt
of a task still names the request that scheduled it. The worker then records:

- *hold* (INTERNAL), in the scheduling trace: from the publish stamp to the moment the
  handler starts, the time the broker and the worker held the task;
- *execute* (CONSUMER), the handler's span and the parent of whatever the handler traces:
  a trace of its own, **linked** to the schedule span (a delay of days would otherwise
  make one trace days long), with the task id, attempt and lateness;
- *retry* and *park*, inside *execute*, when the attempt failed.

Without OpenTelemetry installed (or with only its API and no SDK configured) every call
here does nothing: ``schedule()`` and the worker ask ``recording()`` once per task (about
0.1 us without a provider) and take their untraced path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, MutableMapping
from importlib import metadata
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - the extra is not installed
    trace = None  # type: ignore[assignment]

#: The W3C Trace Context headers, carried as AMQP headers.
TRACE_HEADERS = ("traceparent", "tracestate")

_NAME = "rmqdelay"


def _tracer() -> Any:
    return trace.get_tracer(_NAME, _version())


@functools.cache
def _version() -> str:
    return metadata.version(_NAME)


def recording() -> bool:
    """Whether spans would be recorded: OpenTelemetry is installed and an SDK tracer
    provider set (with the API alone, its no-op provider)."""
    if trace is None:
        return False
    # The API's own getter reads os.environ on every call (~1 us, per task): look at what
    # set_tracer_provider() set first, where the API keeps it (the getter if it moved).
    if getattr(trace, "_TRACER_PROVIDER", _MOVED) is None and not _PROVIDER_FROM_ENV:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


_MOVED = object()
#: A provider named by the environment (auto-instrumentation), read once at import.
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


@contextlib.contextmanager
def producing(
    name: str,
    headers: MutableMapping[str, Any] | None = None,
    *,
    parent_headers: Any = None,
    **attributes: Any,
) -> Iterator[Any]:
    """A PRODUCER span for publishing tasks; its context goes into ``headers`` (or later
    through ``inject``). ``parent_headers``: a message whose trace this continues (the
    bridge's, from the plugin's publisher)."""
    if not recording():
        yield None
        return
    parent = propagate.extract(dict(parent_headers or {})) if parent_headers else None
    with _tracer().start_as_current_span(
        f"{_NAME} {name}", context=parent, kind=SpanKind.PRODUCER, attributes=_attrs(attributes)
    ) as span:
        if headers is not None:
            inject(headers)
        yield span


def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current span's context into ``headers`` (W3C ``traceparent``)."""
    if recording():
        propagate.inject(headers)


@contextlib.contextmanager
def executing(
    headers: Any, destination: str, task_id: str | None, published_ms: Any
) -> Iterator[Any]:
    """The hold span (publish to now, in the scheduling trace) and, around the body, the
    execute span (a new trace linked to the schedule span)."""
    if not recording():
        yield None
        return
    tracer = _tracer()
    scheduled = propagate.extract(dict(headers or {}))
    scheduled_span = trace.get_current_span(scheduled).get_span_context()
    attributes = _attrs({"destination": destination, "task_id": task_id})
    now_ns = time.time_ns()
    if isinstance(published_ms, int) and 0 < published_ms * 1_000_000 <= now_ns:
        tracer.start_span(
            f"{_NAME} hold",
            context=scheduled,
            start_time=published_ms * 1_000_000,
            attributes=attributes,
        ).end(end_time=now_ns)
    links = [Link(scheduled_span)] if scheduled_span.is_valid else []
    with tracer.start_as_current_span(
        f"{_NAME} execute",
        context=otel_context.Context(),  # a trace of its own: the delay may be days
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
        record_exception=False,
    ) as span:
        yield span


def outcome(span: Any, what: str, error: str | None = None, **attributes: Any) -> None:
    """Record how an execution ended on its span (``error``: a failed attempt)."""
    if span is None:
        return
    span.set_attribute("rmqdelay.outcome", what)
    for key, value in _attrs(attributes).items():
        span.set_attribute(key, value)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))


@contextlib.contextmanager
def step(name: str, **attributes: Any) -> Iterator[None]:
    """An INTERNAL span (retry, park) inside the current one."""
    if not recording():
        yield
        return
    with _tracer().start_as_current_span(f"{_NAME} {name}", attributes=_attrs(attributes)):
        yield


def _attrs(attributes: dict[str, Any]) -> dict[str, Any]:
    """``rmqdelay.*`` attributes, and the messaging ones OpenTelemetry's conventions name."""
    out: dict[str, Any] = {"messaging.system": "rabbitmq"}
    for key, value in attributes.items():
        if value is None:
            continue
        if key == "destination":
            out["messaging.destination.name"] = value
        plain = isinstance(value, str | int | float | bool)
        out[f"rmqdelay.{key}"] = value if plain else str(value)
    return out
