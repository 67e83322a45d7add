"""A worker's Prometheus metrics and its small HTTP endpoint (/metrics, /healthz)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

#: Lateness buckets (seconds): the pipeline aims at tens of milliseconds.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class WorkerMetrics:
    """Counters, gauges and histograms of one worker, in a registry of its own.

    The attributes are already bound to the worker's destination label: the per-task path
    does no label lookups.
    """

    def __init__(self, destination: str, namespace: str = "rmqdelay") -> None:
        self.registry = CollectorRegistry()
        # The namespace too: one Prometheus watches every deployment (the alert rules of
        # ``rmqdelay alerts`` select on it).
        labels = ["destination", "namespace"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(destination, namespace)

        self.executed = counter("rmqdelay_tasks_executed", "Tasks whose handler returned")
        self.failed = counter("rmqdelay_tasks_failed", "Handler runs that raised or timed out")
        self.retried = counter("rmqdelay_tasks_retried", "Tasks sent back for another attempt")
        self.parked = counter("rmqdelay_tasks_parked", "Tasks moved to the parking lot")
        self.cancelled = counter("rmqdelay_tasks_cancelled", "Tasks skipped as cancelled")
        self.repeated = counter(
            "rmqdelay_tasks_repeated",
            "Redeliveries of tasks this worker had run already (their ack was lost), not run again",
        )
        self.past_due = counter(
            "rmqdelay_tasks_past_due",
            "Executed tasks scheduled with a due time already past (lateness counted from "
            "their publish time)",
        )
        self.held = Gauge(
            "rmqdelay_tasks_held",
            "Tasks delivered before their due time, held (unacked) until it",
            labels,
            registry=self.registry,
        ).labels(destination, namespace)
        self.in_flight = Gauge(
            "rmqdelay_tasks_in_flight", "Handlers running now", labels, registry=self.registry
        ).labels(destination, namespace)
        self.lateness = Histogram(
            "rmqdelay_task_lateness_seconds",
            "Execution start minus due time",
            labels,
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        ).labels(destination, namespace)
        self.duration = Histogram(
            "rmqdelay_handler_duration_seconds", "Handler run time", labels, registry=self.registry
        ).labels(destination, namespace)
        self.connected = Gauge(
            "rmqdelay_connected", "1 while connected and consuming", labels, registry=self.registry
        ).labels(destination, namespace)
        self.cancels_behind = Gauge(
            "rmqdelay_cancels_behind_seconds",
            "How long the cancellation set has not been current (0: it is); the worker runs "
            "nothing meanwhile",
            labels,
            registry=self.registry,
        ).labels(destination, namespace)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


async def serve(
    metrics: WorkerMetrics,
    health: Callable[[], dict[str, bool]],
    port: int,
    host: str = "0.0.0.0",
) -> asyncio.Server:
    """Serve GET /metrics and GET /healthz (200 when healthy, else 503) on ``port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)).strip():
                pass  # headers: not needed
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
            elif path in ("/healthz", "/health"):
                state = health()
                status = "200 OK" if all(state.values()) else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(state).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError) as e:
            log.debug("metrics request dropped: %s", e)
        finally:
            writer.close()

    # One address family: with host=None, port 0 would give IPv4 and IPv6 different ports.
    server = await asyncio.start_server(handle, host, port)
    log.info("serving /metrics and /healthz on port %d", server.sockets[0].getsockname()[1])
    return server
