"""The whole broker topology as plain data, computed from a layout. Pure; no I/O.

``declare.py`` walks this data to declare it; ``definitions.py`` renders it as RabbitMQ
definitions. Neither computes an argument of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from rmqdelay.core.delays import level_ttl_ms
from rmqdelay.core.names import Names
from rmqdelay.core.routes import Backend
from rmqdelay.core.wire import DELIVER, ROUTE_IN, route_header

QueueType: TypeAlias = Literal["quorum", "classic"]
ExchangeType: TypeAlias = Literal["direct", "fanout", "topic", "headers", "x-delayed-message"]
#: What a bridge's target exchange may be (the plugin's x-delayed-type choices).
TARGET_TYPES: tuple[ExchangeType, ...] = ("direct", "fanout", "topic", "headers")
#: Marks an exchange as a bridge's source, naming its target (``rmqdelay bridge``).
BRIDGE_ARGUMENT = "x-rmqdelay-bridge-to"
ArgValue: TypeAlias = str | int
Arguments: TypeAlias = dict[str, ArgValue]


@dataclass(frozen=True, slots=True)
class Layout:
    """The settings that shape the topology; two clients agree iff their layouts do."""

    namespace: str
    queue_type: QueueType
    resolution_ms: int
    levels: int
    cancel_retention_s: int = 3653 * 86400
    #: ``plugin``: one x-delayed-message exchange instead of the levels.
    backend: Backend = "levels"
    #: Independent level sets; a task waits in the one its id picks (``routes.shard_of``).
    shards: int = 1
    #: Members of each quorum queue and of the stream when created (the broker caps this
    #: at the cluster's size); None leaves it to the broker.
    replicas: int | None = 3
    #: Deliveries of one message a quorum work queue allows before it dead-letters it to
    #: the parking lot (workers that keep dying with it). Set on every version alike:
    #: RabbitMQ 4.x would otherwise apply 20, 3.x no limit at all.
    delivery_limit: int = 20
    #: Whether the schedule exchanges copy every task into the journal stream (what
    #: lookups, reschedules and exports read; docs/design.md, "The journal").
    journal: bool = True
    #: How long the journal keeps a task's copy; a task scheduled longer ago than this is
    #: no longer listed (exports and transfers say how many are missing).
    journal_retention_s: int = 7 * 86400

    @property
    def names(self) -> Names:
        """Object names for this namespace."""
        return Names(self.namespace)


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    """A durable exchange."""

    name: str
    type: ExchangeType
    arguments: Arguments = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A durable queue."""

    name: str
    arguments: Arguments
    #: Where the broker puts the queue's replicas and leader. Used only when the queue is
    #: created: a queue that exists with other placement is not a mismatch (declare.py).
    placement: Arguments = field(default_factory=dict)
    #: Arguments this release creates the queue with that earlier ones did not: a queue
    #: that exists without them is accepted (the broker cannot add an argument to a queue)
    #: and brought up to them by a policy (``definitions.policies``).
    added: Arguments = field(default_factory=dict)

    @property
    def creation_arguments(self) -> Arguments:
        """Everything to create the queue with."""
        return {**self.arguments, **self.added, **self.placement}


@dataclass(frozen=True, slots=True)
class BindingSpec:
    """A binding from ``source`` exchange to a queue or an exchange."""

    source: str
    destination: str
    destination_type: Literal["queue", "exchange"]
    routing_key: str = ""
    arguments: Arguments = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything to declare, in an order that declares cleanly front to back."""

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]


#: The delivery limit of a quorum queue with nowhere to dead-letter to (the parking lot,
#: the unroutable queue, a bridge's intake): at its limit the broker would drop a message
#: without a word, and RabbitMQ 4.x counts every return (4.0-4.2 even every basic.get),
#: so each look at a parked task would count. The largest 32-bit value: a look every
#: millisecond for 24 days. Not -1, which 4.x reads as "no limit" but 3.x accepts and
#: drops the message at its first return.
UNLIMITED_DELIVERIES = 2**31 - 1
DELIVERY_LIMIT = "x-delivery-limit"


def _delivery_limit(queue_type: QueueType, limit: int) -> Arguments:
    """The delivery limit argument (none for classic queues: they have no limit)."""
    return {DELIVERY_LIMIT: limit} if queue_type == "quorum" else {}


def _queue_arguments(
    queue_type: QueueType, *, dead_letter_exchange: str | None = None
) -> Arguments:
    args: Arguments = {"x-queue-type": queue_type}
    if dead_letter_exchange is not None:
        args["x-dead-letter-exchange"] = dead_letter_exchange
        if queue_type == "quorum":
            # at-least-once only holds with reject-publish; with the default drop-head the
            # broker silently falls back to at-most-once (docs/design.md, "Quorum queues").
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    return args


#: Placement arguments: replica count by queue type, and where leaders go. "balanced"
#: puts each new leader on the node leading the fewest queues, so levels (and shards) are
#: led by every node instead of all by the one that declared them (RabbitMQ 3.10+).
_REPLICAS_ARG = {"quorum": "x-quorum-initial-group-size", "stream": "x-initial-cluster-size"}
LEADER_LOCATOR = "x-queue-leader-locator"
#: How long cancel-set snapshots are kept: a starting worker reads only the last hours of
#: them (broker/cancels.py), the rest is slack for workers that were all down a while.
SNAPSHOT_RETENTION_S = 2 * 86_400
#: How long worker stats records are kept (the dashboard shows the last minutes).
STATS_RETENTION_S = 3600
STATS_SEGMENT_BYTES = 1_000_000
#: How long the parking lot's and the unroutable queue's logs keep a copy: a message set
#: aside longer than this is still there, and looked up by taking the queue (slower).
ASIDE_LOG_RETENTION_S = 30 * 86_400
#: Their segments: small enough for the age to apply at a few parked tasks a day.
ASIDE_LOG_SEGMENT_BYTES = 50_000_000


def placement(layout: Layout, queue_type: str) -> Arguments:
    """Placement arguments for a new queue of ``queue_type`` (none for classic queues)."""
    if queue_type not in _REPLICAS_ARG:
        return {}
    args: Arguments = {LEADER_LOCATOR: "balanced"}
    if layout.replicas is not None:
        args[_REPLICAS_ARG[queue_type]] = layout.replicas
    return args


def level_queue_spec(layout: Layout, level: int, shard: int = 0) -> QueueSpec:
    """The queue for one delay level of one shard."""
    names = layout.names
    args = _queue_arguments(
        layout.queue_type, dead_letter_exchange=names.after_exchange(level, shard)
    )
    args["x-message-ttl"] = level_ttl_ms(level, layout.resolution_ms)
    return QueueSpec(names.level_queue(level, shard), args, placement(layout, layout.queue_type))


def work_queue_spec(layout: Layout, destination: str) -> QueueSpec:
    """A destination's work queue; rejected messages, and messages over the delivery
    limit, dead-letter to the parking lot."""
    names = layout.names
    return QueueSpec(
        names.work_queue(destination),
        _queue_arguments(layout.queue_type, dead_letter_exchange=names.parked),
        placement(layout, layout.queue_type),
        _delivery_limit(layout.queue_type, layout.delivery_limit),
    )


def aside_queue_spec(layout: Layout, name: str) -> QueueSpec:
    """A queue whose messages wait for an operator or a bridge, with nowhere to
    dead-letter to: no delivery limit may drop them (``UNLIMITED_DELIVERIES``)."""
    return QueueSpec(
        name,
        _queue_arguments(layout.queue_type),
        placement(layout, layout.queue_type),
        _delivery_limit(layout.queue_type, UNLIMITED_DELIVERIES),
    )


def work_queue_binding(layout: Layout, destination: str) -> BindingSpec:
    """Binds a destination's work queue to the work exchange."""
    names = layout.names
    return BindingSpec(
        names.work_exchange, names.work_queue(destination), "queue", routing_key=destination
    )


def _route_binding(
    source: str, header: str, stop: int | None, names: Names, shard: int
) -> BindingSpec:
    """``source`` sends messages whose ``header`` names ``stop`` to that level of the same
    shard (or to work)."""
    arguments: Arguments = {"x-match": "all", header: DELIVER if stop is None else str(stop)}
    if stop is None:
        return BindingSpec(source, names.work_exchange, "exchange", arguments=arguments)
    return BindingSpec(source, names.level_queue(stop, shard), "queue", arguments=arguments)


def build_topology(layout: Layout, destinations: tuple[str, ...] = ()) -> Topology:
    """All exchanges, queues and bindings for ``layout`` (plus work queues for ``destinations``).

    Every exchange a level dead-letters into, and the work exchange, has the unroutable
    exchange as alternate: under at-least-once dead-lettering a message that routes nowhere
    would stay at the head of its level and block everything behind it.
    """
    if layout.backend == "plugin":
        return _plugin_topology(layout, destinations)
    names = layout.names
    levels, shards = range(layout.levels), range(layout.shards)
    catch_all: Arguments = {"alternate-exchange": names.unroutable}
    exchanges = (
        ExchangeSpec(names.unroutable, "fanout"),
        ExchangeSpec(names.parked, "fanout"),
        ExchangeSpec(names.work_exchange, "direct", dict(catch_all)),
        # No alternate here: a publisher with a malformed plan gets its message returned
        # (mandatory) instead of it vanishing into the unroutable queue.
        *(ExchangeSpec(names.schedule_exchange_of(s), "headers") for s in shards),
        *(
            ExchangeSpec(names.after_exchange(k, s), "headers", dict(catch_all))
            for s in shards
            for k in levels
        ),
    )
    queues = (
        *_common_queues(layout),
        journal_spec(layout),
        # Level by level, shard by shard: with balanced leader placement, the busy low
        # levels of different shards get leaders on different nodes.
        *(level_queue_spec(layout, k, s) for k in levels for s in shards),
        *(work_queue_spec(layout, d) for d in destinations),
    )
    bindings = list(_common_bindings(names))
    for s in shards:
        schedule = names.schedule_exchange_of(s)
        bindings.append(_route_binding(schedule, ROUTE_IN, None, names, s))
        bindings.extend(_route_binding(schedule, ROUTE_IN, k, names, s) for k in levels)
        for k in levels:
            after, header = names.after_exchange(k, s), route_header(k)
            bindings.append(_route_binding(after, header, None, names, s))
            bindings.extend(_route_binding(after, header, j, names, s) for j in range(k))
        if layout.journal:
            bindings.extend(journal_bindings(layout, s))
    bindings.extend(work_queue_binding(layout, d) for d in destinations)
    return Topology(exchanges, queues, tuple(bindings))


def journal_spec(layout: Layout) -> QueueSpec:
    """The journal: a stream kept for the journal retention (a week by default): every
    task's copy is written once, so its disk grows with the schedule rate times this."""
    return QueueSpec(
        layout.names.journal,
        {"x-queue-type": "stream", "x-max-age": f"{layout.journal_retention_s}s"},
        placement(layout, "stream"),
    )


def journal_bindings(layout: Layout, shard: int) -> list[BindingSpec]:
    """A shard's schedule exchange copies each task with a valid first stop to the
    journal: one binding per stop, not one matching everything, so that a message with a
    malformed plan still routes nowhere and is returned to its publisher (mandatory)."""
    names = layout.names
    schedule = names.schedule_exchange_of(shard)
    stops = [DELIVER, *(str(k) for k in range(layout.levels))]
    return [
        BindingSpec(schedule, names.journal, "queue", arguments={"x-match": "all", ROUTE_IN: stop})
        for stop in stops
    ]


def _common_queues(layout: Layout) -> tuple[QueueSpec, ...]:
    names = layout.names
    return (
        aside_queue_spec(layout, names.unroutable),
        aside_queue_spec(layout, names.parked),
        aside_log_spec(layout, names.unroutable),
        aside_log_spec(layout, names.parked),
        QueueSpec(
            names.cancels,
            {"x-queue-type": "stream", "x-max-age": f"{layout.cancel_retention_s}s"},
            placement(layout, "stream"),
        ),
        # No age limit: a series added years ago is still a series.
        QueueSpec(names.series, {"x-queue-type": "stream"}, placement(layout, "stream")),
        QueueSpec(
            names.cancel_snapshots,
            {"x-queue-type": "stream", "x-max-age": f"{SNAPSHOT_RETENTION_S}s"},
            placement(layout, "stream"),
        ),
        # An hour of worker records, in 1 MB segments: the age applies when a segment
        # rolls, and at a few MB a day per worker a 500 MB one would never roll.
        QueueSpec(
            names.stats,
            {
                "x-queue-type": "stream",
                "x-max-age": f"{STATS_RETENTION_S}s",
                "x-stream-max-segment-size-bytes": STATS_SEGMENT_BYTES,
            },
            placement(layout, "stream"),
        ),
    )


def aside_log_spec(layout: Layout, aside: str) -> QueueSpec:
    """The log beside a queue set aside (``Names.aside_log``)."""
    return QueueSpec(
        layout.names.aside_log(aside),
        {
            "x-queue-type": "stream",
            "x-max-age": f"{ASIDE_LOG_RETENTION_S}s",
            "x-stream-max-segment-size-bytes": ASIDE_LOG_SEGMENT_BYTES,
        },
        placement(layout, "stream"),
    )


def _common_bindings(names: Names) -> tuple[BindingSpec, ...]:
    return (
        BindingSpec(names.unroutable, names.unroutable, "queue"),
        BindingSpec(names.parked, names.parked, "queue"),
        # The exchanges are fanouts: whatever reaches a queue set aside reaches its log.
        BindingSpec(names.unroutable, names.aside_log(names.unroutable), "queue"),
        BindingSpec(names.parked, names.aside_log(names.parked), "queue"),
    )


def _plugin_topology(layout: Layout, destinations: tuple[str, ...]) -> Topology:
    """The plugin backend: one x-delayed-message exchange feeding the work exchange.

    It is a fanout inside, so every routing key (the destination) passes through unchanged
    to the work exchange, whose alternate catches destinations without a queue.
    """
    names = layout.names
    exchanges = (
        ExchangeSpec(names.unroutable, "fanout"),
        ExchangeSpec(names.parked, "fanout"),
        ExchangeSpec(names.work_exchange, "direct", {"alternate-exchange": names.unroutable}),
        ExchangeSpec(names.delayed_exchange, "x-delayed-message", {"x-delayed-type": "fanout"}),
    )
    queues = (*_common_queues(layout), *(work_queue_spec(layout, d) for d in destinations))
    bindings = (
        *_common_bindings(names),
        BindingSpec(names.delayed_exchange, names.work_exchange, "exchange"),
        *(work_queue_binding(layout, d) for d in destinations),
    )
    return Topology(exchanges, queues, bindings)


def destination_topology(layout: Layout, destination: str) -> Topology:
    """Just a destination's work queue and its binding (the rest is declared elsewhere)."""
    return Topology(
        (), (work_queue_spec(layout, destination),), (work_queue_binding(layout, destination),)
    )


def bridge_topology(
    layout: Layout, source: str, target: str, target_type: ExchangeType, destination: str
) -> Topology:
    """What ``rmqdelay bridge`` declares: ``source``, where publishers send as to the plugin,
    as a fanout into the bridge's intake queue (every routing key, kept in the message);
    ``target``, where consumers' queues are bound; and the work queue of ``destination``,
    through which the bridged messages wait in the levels."""
    intake = layout.names.bridge_intake(source)
    return Topology(
        (
            ExchangeSpec(source, "fanout", {BRIDGE_ARGUMENT: target}),
            ExchangeSpec(target, target_type),
        ),
        (aside_queue_spec(layout, intake), work_queue_spec(layout, destination)),
        (BindingSpec(source, intake, "queue"), work_queue_binding(layout, destination)),
    )
