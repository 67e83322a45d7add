"""``rmqdelay status``: what is pending where, read from the broker without changing it.

Counts come from the management API when it answers (it alone knows unacked counts and can
list the destinations); otherwise from passive declares over AMQP, which give ready
messages and consumers of queues named in advance.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.connection import connect_once
from rmqdelay.broker.management import management_get, management_url, vhost_of, vhost_path
from rmqdelay.core.delays import level_ttl_ms
from rmqdelay.core.delivery_limits import limit_troubles, parse_version
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Counts:
    """One queue's counts; None where the source cannot tell (or the queue is missing)."""

    name: str
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    exists: bool = True
    #: Replicated queues (quorum, stream), from the management API: the node leading it,
    #: every member, and the members online now.
    leader: str | None = None
    members: tuple[str, ...] = ()
    online: tuple[str, ...] = ()

    @property
    def total(self) -> int | None:
        """Ready plus unacked, when both are known (otherwise what is known)."""
        if self.ready is None:
            return None
        return self.ready + (self.unacked or 0)


@dataclass(frozen=True, slots=True)
class Level:
    """A delay level: its TTL and how many tasks wait in it."""

    level: int
    ttl_ms: int
    pending: int | None
    exists: bool
    leader: str | None = None
    members: tuple[str, ...] = ()
    online: tuple[str, ...] = ()
    #: Which level set (RMQDELAY_SHARDS); 0 without shards.
    shard: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """One snapshot of a namespace."""

    namespace: str
    vhost: str
    backend: str
    source: str
    levels: list[Level] = field(default_factory=list)
    destinations: list[Counts] = field(default_factory=list)
    parked: int | None = None
    unroutable: int | None = None
    cancel_records: int | None = None
    #: When the counts were read (UTC, ISO 8601).
    sampled_at: str = ""
    notes: list[str] = field(default_factory=list)
    #: Broker limits running low (file handles, Erlang processes), alarms raised.
    warnings: list[str] = field(default_factory=list)
    #: Resource alarms raised now, as "<node>: disk" or "<node>: memory" (management only).
    alarms: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        document = asdict(self)
        for d in document["destinations"]:
            d["destination"] = d.pop("name")
        return document


#: What the management API is asked of each queue: counts, replicas, and what decides
#: its delivery limit.
_COLUMNS = (
    "name,type,messages_ready,messages_unacknowledged,consumers,messages,leader,members,online,"
    "arguments,effective_policy_definition,policy,operator_policy,delivery_limit"
)


async def _from_management(settings: Settings) -> list[dict[str, Any]] | None:
    """The namespace's queues as the management API lists them (None when none answers)."""
    queues = await management_get(settings, f"queues/{vhost_path(settings)}", _COLUMNS)
    if queues is None:
        return None
    prefix = f"{settings.namespace}."
    return [q for q in queues if str(q.get("name", "")).startswith(prefix)]


def _counts(queue: dict[str, Any]) -> Counts:
    return Counts(
        queue["name"],
        ready=queue.get("messages_ready", queue.get("messages")),
        unacked=queue.get("messages_unacknowledged"),
        consumers=queue.get("consumers"),
        leader=queue.get("leader"),
        members=tuple(queue.get("members") or ()),
        online=tuple(queue.get("online") or ()),
    )


async def limit_warnings(settings: Settings, queues: list[dict[str, Any]]) -> list[str]:
    """Queues whose delivery limit could drop a message, or differs from the settings',
    grouped by trouble."""
    overview = await management_get(settings, "overview", "rabbitmq_version")
    version = parse_version((overview or {}).get("rabbitmq_version"))
    names = settings.names
    troubles = limit_troubles(
        queues,
        version,
        aside={names.parked, names.unroutable},
        aside_prefix=names.bridge_intake(""),
        work_prefix=names.work_queue(""),
        work_limit=settings.delivery_limit,
    )
    grouped: dict[str, list[str]] = {}
    for found in troubles:
        grouped.setdefault(found.trouble, []).append(found.queue)
    return [f"{_listed(queues)}: {trouble}" for trouble, queues in grouped.items()]


async def _from_amqp(settings: Settings, names: list[str]) -> dict[str, Counts]:
    counts: dict[str, Counts] = {}
    connection = await connect_once(settings)
    async with connection:
        channel = await connection.channel()
        for name in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity:
                counts[name] = Counts(name, exists=False)
                channel = await connection.channel()  # a failed passive declare closes it
                continue
            ok = queue.declaration_result
            counts[name] = Counts(name, ready=ok.message_count, consumers=ok.consumer_count)
    return counts


async def _plugin_exchange_exists(settings: Settings) -> bool:
    connection = await connect_once(settings)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.get_exchange(settings.names.delayed_exchange, ensure=True)
        except ChannelNotFoundEntity:
            return False
    return True


#: Queues of one namespace (29 levels at the default 1,024 ms, parking lot, unroutable,
#: two streams, and a few work queues; more with shards), about 3 file handles each.
QUEUES_PER_NAMESPACE = 37
HANDLES_PER_NAMESPACE = 3 * QUEUES_PER_NAMESPACE
#: Warn above this share of a broker limit in use.
HEADROOM_WARN = 0.8


def headroom_warnings(nodes: list[dict[str, Any]]) -> list[str]:
    """Warnings for nodes short of file handles or Erlang processes (management /api/nodes).

    Near the file limit a broker accepts TCP connections and never finishes the AMQP
    handshake, for every client: it must be seen before it happens.
    """
    found = []
    for node in nodes:
        name = node.get("name", "?")
        used, total = node.get("fd_used"), node.get("fd_total")
        if isinstance(used, int) and isinstance(total, int) and total > 0:
            left = total - used
            if used > HEADROOM_WARN * total or left < 2 * HANDLES_PER_NAMESPACE:
                found.append(
                    f"node {name}: {used} of {total} file handles in use ({left} left, about "
                    f"{left // HANDLES_PER_NAMESPACE} more namespace(s)); raise the broker's "
                    "open-file limit (ulimit -n / LimitNOFILE) or remove unused namespaces "
                    "('rmqdelay destroy')"
                )
        used, total = node.get("proc_used"), node.get("proc_total")
        if isinstance(used, int) and isinstance(total, int) and total > 0:
            if used > HEADROOM_WARN * total:
                found.append(
                    f"node {name}: {used} of {total} Erlang processes in use; raise the "
                    "process limit (RABBITMQ_MAX_NUMBER_OF_PROCESSES) or reduce queues and "
                    "connections"
                )
    return found


#: What the management API is asked of each node: limits, and the alarms with their figures.
_NODE_COLUMNS = (
    "name,fd_used,fd_total,proc_used,proc_total,mem_alarm,mem_used,mem_limit,"
    "disk_free_alarm,disk_free,disk_free_limit"
)


def alarms_raised(nodes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each resource alarm raised (management /api/nodes), as ("<node>: disk", what it
    means). While one is raised the broker blocks every connection that publishes:
    schedule(), cancels, retries and parking wait, then fail at RMQDELAY_PUBLISH_DEADLINE;
    workers go on executing (their acks travel on connections that do not publish)."""
    found = []
    blocked = "the broker blocks every publisher (schedule(), cancel, retries) until it clears"
    for node in nodes:
        name = node.get("name", "?")
        if node.get("disk_free_alarm") is True:
            found.append(
                (
                    f"{name}: disk",
                    f"node {name}: DISK ALARM, {_size(node.get('disk_free'))} free, under its "
                    f"disk_free_limit of {_size(node.get('disk_free_limit'))}; {blocked}",
                )
            )
        if node.get("mem_alarm") is True:
            found.append(
                (
                    f"{name}: memory",
                    f"node {name}: MEMORY ALARM, {_size(node.get('mem_used'))} in use, over "
                    f"its high watermark of {_size(node.get('mem_limit'))}; {blocked}",
                )
            )
    return found


def _size(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:g} B"


async def collect(settings: Settings, destinations: list[str]) -> Status:
    """A snapshot of ``settings``' namespace (all destinations, or those named)."""
    names = settings.names
    backend = settings.backend
    if backend == "auto":  # as a client would resolve it, but without declaring anything
        backend = "plugin" if await _plugin_exchange_exists(settings) else "levels"
    levels = (
        []
        if backend == "plugin"
        else [
            (k, shard, names.level_queue(k, shard))
            for shard in range(settings.shards)
            for k in range(settings.levels)
        ]
    )
    fixed = [*(name for _, _, name in levels), names.parked, names.unroutable, names.cancels]
    sampled_at = datetime.now(UTC).isoformat(timespec="seconds")
    listed = await _from_management(settings)
    counts = None if listed is None else {q["name"]: _counts(q) for q in listed}
    notes: list[str] = []
    if counts is None:
        source = "amqp"
        notes.append(
            f"management API not reachable at {management_url(settings)}: unacked counts "
            "unknown, and only destinations named on the command line are shown"
        )
        counts = await _from_amqp(settings, [*fixed, *(names.work_queue(d) for d in destinations)])
        wanted = destinations
    else:
        source = "management"
        prefix = names.work_queue("")
        found = sorted(n[len(prefix) :] for n in counts if n.startswith(prefix))
        wanted = destinations or found
    if backend == "plugin":
        notes.append("tasks waiting inside the delayed-message plugin are not counted by it")
    warnings: list[str] = []
    alarms: list[tuple[str, str]] = []
    if source == "management":
        notes.append(
            "the management API samples counts every few seconds (5 s by default): they can "
            "lag the queues that much"
        )
        replicas = replica_warnings(list(counts.values()))
        # Parked and unroutable counts as the parking-lot tools see them, live.
        counts.update(await _from_amqp(settings, [names.parked, names.unroutable]))
        nodes = await management_get(settings, "nodes", _NODE_COLUMNS)
        alarms = alarms_raised(nodes or [])
        warnings = (
            [text for _, text in alarms]
            + headroom_warnings(nodes or [])
            + replicas
            + await limit_warnings(settings, listed or [])
        )
    missing = Counts("", exists=False)

    def of(name: str) -> Counts:
        return counts.get(name, missing)

    return Status(
        namespace=settings.namespace,
        vhost=vhost_of(settings.url),
        backend=backend,
        source=source,
        levels=[
            Level(
                k,
                level_ttl_ms(k, settings.resolution_ms),
                of(name).total,
                of(name).exists,
                of(name).leader,
                of(name).members,
                of(name).online,
                shard,
            )
            for k, shard, name in levels
        ],
        destinations=[replace(of(names.work_queue(d)), name=d) for d in wanted],
        parked=of(names.parked).total,
        unroutable=of(names.unroutable).total,
        cancel_records=of(names.cancels).ready,
        sampled_at=sampled_at,
        notes=notes,
        warnings=warnings,
        alarms=[alarm for alarm, _ in alarms],
    )


def replica_warnings(queues: list[Counts]) -> list[str]:
    """Replicated queues with members offline, one line per kind of trouble: below its
    quorum a queue neither takes nor delivers messages, so the tasks in it are stuck (not
    lost) until members come back."""
    troubles: dict[str, list[str]] = {}
    for q in queues:
        if not q.members or len(q.online) >= len(q.members):
            continue
        need = len(q.members) // 2 + 1
        if len(q.online) < need:
            state = f"fewer than a quorum of {need}: they move nothing until the rest are back"
        elif len(q.online) == need:
            state = "just a quorum: one more loss and they stop"
        else:
            state = "above a quorum"
        down = ", ".join(sorted(set(q.members) - set(q.online)))
        trouble = f"{len(q.online)} of {len(q.members)} members online ({down} down), {state}"
        troubles.setdefault(trouble, []).append(q.name)
    return [f"{_listed(names)}: {trouble}" for trouble, names in troubles.items()]


def _listed(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"{'queue' if len(names) == 1 else f'{len(names)} queues'} {shown}{more}"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(status: Status) -> str:
    """The one-screen text form."""
    lines = [
        f"namespace {status.namespace}  vhost {status.vhost}  backend {status.backend}  "
        f"(counts from {status.source}, read {status.sampled_at})",
        "",
    ]
    if status.levels:
        replicas = any(lv.members for lv in status.levels)
        lines.append(
            f"{'level':<7}{'ttl':>14}{'pending':>10}"
            + (f"  {'leader':<24}{'online':>7}" if replicas else "")
        )
        for lv in status.levels:
            pending = _n(lv.pending) if lv.exists else "MISSING"
            label = f"{lv.level}.s{lv.shard}" if lv.shard else str(lv.level)
            line = f"{label:<7}{_ttl(lv.ttl_ms):>14}{pending:>10}"
            if replicas:
                online = f"{len(lv.online)}/{len(lv.members)}" if lv.members else "-"
                line += f"  {lv.leader or '-':<24}{online:>7}"
            lines.append(line)
        total = sum(lv.pending or 0 for lv in status.levels)
        lines.append(f"{'all':<7}{'':>14}{total:>10}")
        if replicas:
            led = Counter(lv.leader for lv in status.levels if lv.leader)
            lines.append("leaders: " + ", ".join(f"{n} {c}" for n, c in sorted(led.items())))
        lines.append("")
    lines.append(f"{'destination':<30}{'ready':>9}{'unacked':>9}{'consumers':>11}")
    for d in status.destinations:
        if not d.exists:
            lines.append(f"{d.name:<30}  no work queue")
            continue
        lines.append(f"{d.name:<30}{_n(d.ready):>9}{_n(d.unacked):>9}{_n(d.consumers):>11}")
    if not status.destinations:
        lines.append("(none)")
    lines += [
        "",
        f"parked {_n(status.parked)}   unroutable {_n(status.unroutable)}   "
        f"cancel records retained {_n(status.cancel_records)}",
    ]
    lines += [f"note: {n}" for n in status.notes]
    lines += [f"WARNING: {w}" for w in status.warnings]
    return "\n".join(lines)


def _ttl(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:.4g}{unit}"
    return f"{ms}ms"
