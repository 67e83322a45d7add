"""An OpenTelemetry SDK for one test: spans kept in memory, the global provider put back
afterwards (other tests run with tracing off, as most users do)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class Spans:
    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self._exporter = exporter

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self._exporter.get_finished_spans() if s.name == f"rmqdelay {name}"]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, [s.name for s in self._exporter.get_finished_spans()]
        return found[0]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # trace.set_tracer_provider() may be called once per process: swap the global instead.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield Spans(exporter)
    provider.shutdown()


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent header naming ``span`` (sampled)."""
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-01"


def ids(header: object) -> tuple[str, str]:
    """A traceparent's trace and parent ids (its flags vary: sampled, random)."""
    version, trace_id, span_id, _ = str(header).split("-")
    assert version == "00"
    return trace_id, span_id
