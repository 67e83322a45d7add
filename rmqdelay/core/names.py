"""Every broker object name, derived from the namespace alone. Pure; no I/O.

Other languages publish to these names, so they are part of the wire contract
(docs/reference/wire-format.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rmqdelay.core.errors import InvalidDestinationError

#: Routing-key / queue-name limit of AMQP 0-9-1 (a shortstr), in UTF-8 bytes.
MAX_NAME_BYTES = 255
#: Characters a destination may hold: the AMQP 0-9-1 spec's domain for queue names. Other
#: clients refuse the rest (pamqp, under aio-pika, raises on ``café`` or ``a*b``), ops tools
#: put names in URLs and regular expressions, and ``*``/``#`` are topic wildcards.
DESTINATION_CHARS = "letters A-Z a-z, digits, '-', '_', '.' and ':'"
_DESTINATION = re.compile(r"[A-Za-z0-9_.:-]+")


def _shard(shard: int) -> str:
    # Shard 0 keeps the names of a deployment without shards, so that adding shards later
    # leaves the tasks already waiting where they are.
    return f".s{shard}" if shard else ""


@dataclass(frozen=True, slots=True)
class Names:
    """Names of one deployment's objects: ``<namespace>.<role>[.<detail>]``."""

    namespace: str

    @property
    def schedule_exchange(self) -> str:
        """Headers exchange publishers send to; routes on ``rmqdelay-route-in``."""
        return f"{self.namespace}.schedule"

    def schedule_exchange_of(self, shard: int) -> str:
        """The schedule exchange of one level set (shard 0 is ``schedule_exchange``)."""
        return f"{self.namespace}.schedule{_shard(shard)}"

    def level_queue(self, level: int, shard: int = 0) -> str:
        """Queue holding messages exactly ``resolution * 2**level``."""
        return f"{self.namespace}.level.{level:02d}{_shard(shard)}"

    def after_exchange(self, level: int, shard: int = 0) -> str:
        """Headers exchange ``level`` dead-letters into; routes on ``rmqdelay-route-<level>``."""
        return f"{self.namespace}.after.{level:02d}{_shard(shard)}"

    @property
    def work_exchange(self) -> str:
        """Direct exchange: routing key = destination."""
        return f"{self.namespace}.work"

    def work_queue(self, destination: str) -> str:
        """The queue workers of ``destination`` consume."""
        return f"{self.namespace}.work.{destination}"

    def bridge_intake(self, source: str) -> str:
        """The queue ``rmqdelay bridge`` reads what publishers send to exchange ``source``."""
        return f"{self.namespace}.bridge.{source}"

    @property
    def delayed_exchange(self) -> str:
        """``x-delayed-message`` exchange of the plugin backend; feeds the work exchange."""
        return f"{self.namespace}.delayed"

    @property
    def unroutable(self) -> str:
        """Fanout exchange and queue catching whatever no binding matched."""
        return f"{self.namespace}.unroutable"

    @property
    def parked(self) -> str:
        """Fanout exchange and queue for tasks that failed or could not be decoded."""
        return f"{self.namespace}.parked"

    def aside_log(self, aside: str) -> str:
        """Stream bound beside the queue ``aside`` (the parking lot, the unroutable queue):
        a copy of every message that went there, and a record of each one rmqdelay's tools
        took out, so one can be looked up without taking the whole queue."""
        return f"{aside}.log"

    @property
    def cancels(self) -> str:
        """Stream of cancel records every worker replays and follows."""
        return f"{self.namespace}.cancels"

    @property
    def series(self) -> str:
        """Stream of recurring-series records: the registry ``rmqdelay recurring list``
        reads (compacted by key on read); the series themselves live in their tasks."""
        return f"{self.namespace}.series"

    @property
    def journal(self) -> str:
        """Stream holding a copy of every task as it entered the levels (the broker routes
        it there): what lookups, reschedules and exports read."""
        return f"{self.namespace}.journal"

    @property
    def journal_keeper(self) -> str:
        """Exclusive queue a journal keeper holds while it keeps the journal: the broker
        lets one connection have it, so one worker of a fleet keeps at a time."""
        return f"{self.namespace}.journal.keeper"

    @property
    def stats(self) -> str:
        """Stream of what workers did, a record per worker every few seconds: what the
        dashboard's overview shows (executed, failed, parked, lateness)."""
        return f"{self.namespace}.stats"

    @property
    def cancel_snapshots(self) -> str:
        """Stream of snapshots of the live cancel set, so a starting worker need not
        replay the whole cancellation stream."""
        return f"{self.namespace}.cancels.snapshots"

    @property
    def max_destination_bytes(self) -> int:
        """Longest destination (UTF-8 bytes) whose work queue name still fits."""
        return MAX_NAME_BYTES - len(self.work_queue("").encode())

    def check_destination(self, destination: object) -> str:
        """Return ``destination`` if it can name a work queue, else say why not."""
        if not isinstance(destination, str) or not destination:
            raise InvalidDestinationError(
                f"destination must be a non-empty string, got {destination!r}"
            )
        size, limit = len(destination.encode()), self.max_destination_bytes
        if size > limit:
            raise InvalidDestinationError(
                f"destination {destination[:40]!r}... is {size} bytes long; with namespace "
                f"{self.namespace!r} the limit is {limit} bytes (AMQP names are at most "
                f"{MAX_NAME_BYTES})"
            )
        if not _DESTINATION.fullmatch(destination):
            bad = sorted({c for c in destination if not _DESTINATION.fullmatch(c)})
            raise InvalidDestinationError(
                f"destination {destination!r} contains {', '.join(map(repr, bad))}: a destination "
                f"names a queue and may hold only {DESTINATION_CHARS} (AMQP 0-9-1 names)"
            )
        return destination
