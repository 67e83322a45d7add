"""Tracing is off unless an SDK provider is set, and then writes W3C headers."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from rmqdelay.broker import tracing


def test_off_without_a_provider_and_nothing_is_written() -> None:
    assert not tracing.recording()
    headers: dict[str, object] = {}
    with tracing.producing("schedule", headers, destination="d") as span:
        assert span is None
    assert headers == {}


def test_on_with_an_sdk_provider_the_span_context_goes_into_the_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", TracerProvider())
    assert tracing.recording()
    headers: dict[str, object] = {}
    with tracing.producing("schedule", headers, destination="d", task_id=None) as span:
        context = span.get_span_context()
    version, trace_id, span_id, _flags = str(headers["traceparent"]).split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{context.trace_id:032x}",
        f"{context.span_id:016x}",
    )
    assert span.attributes["messaging.destination.name"] == "d"
    assert "rmqdelay.task_id" not in span.attributes, "None is left out"
