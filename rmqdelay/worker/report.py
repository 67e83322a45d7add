"""A worker's records for the dashboard: every few seconds, what it did since the last
one, appended to the namespace's stats stream (``core/workstats.py`` has the format).

Best effort by design: a record that cannot be written is a gap in a chart, never a
reason to hold up a task, so a failure is logged once per outage and the next record
carries the counts on (each record is a difference from the last one written).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractChannel

from rmqdelay.core.workstats import StatsRecord, delta
from rmqdelay.worker.stats import WorkerStats

log = logging.getLogger(__name__)

#: Seconds between records: the dashboard's charts move in steps of this.
REPORT_EVERY_S = 5.0
#: How long one record may take to be confirmed before it is given up on.
REPORT_TIMEOUT_S = 5.0


def worker_id() -> str:
    """Who the records are from: host, process and a random part (one process may run
    several workers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Reporter:
    """Writes one worker's records while it consumes."""

    def __init__(self, stats: WorkerStats, destination: str, stream: str) -> None:
        self.stats, self.destination, self.stream = stats, destination, stream
        self.worker = worker_id()
        self._counts = stats.counted()
        self._lateness = tuple(stats.lateness_buckets)
        self._since_ms = time.time_ns() // 1_000_000
        self._failing = False

    def record(self, now_ms: int) -> StatsRecord:
        """What happened since the last record written (not yet marked written)."""
        return StatsRecord(
            self.worker,
            self.destination,
            self._since_ms,
            now_ms,
            delta(self.stats.counted(), self._counts),
            delta(self.stats.lateness_buckets, self._lateness),
        )

    def written(self, record: StatsRecord) -> None:
        """``record`` is in the stream: the next one starts where it ended."""
        self._counts = tuple(
            before + grown for before, grown in zip(self._counts, record.counts, strict=True)
        )
        self._lateness = tuple(
            before + grown for before, grown in zip(self._lateness, record.lateness, strict=True)
        )
        self._since_ms = record.to_ms

    async def run(self, channel: AbstractChannel) -> None:
        """Write a record every ``REPORT_EVERY_S`` until cancelled."""
        while True:
            await asyncio.sleep(REPORT_EVERY_S)  # a period, not a wait for an event
            await self.write(channel)

    async def write(self, channel: AbstractChannel) -> None:
        """Write the record of now; log (once per outage) if it cannot be."""
        record = self.record(time.time_ns() // 1_000_000)
        message = aio_pika.Message(
            record.encode(), content_type="application/json", delivery_mode=2
        )
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                await channel.default_exchange.publish(message, routing_key=self.stream)
        except Exception as e:  # a lost record must not stop the worker
            if not self._failing:
                log.warning("could not write a stats record to %s (%s); will retry", self.stream, e)
            self._failing = True
            return
        if self._failing:
            log.info("stats records are written to %s again", self.stream)
        self._failing = False
        self.written(record)
