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
from urllib.parse import quote, unquote, urlsplit

import httpx
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.connection import connect_once
from rmqdelay.core.delays import level_ttl_ms
from rmqdelay.core.redact import redact_url, split_urls
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
    #: Broker limits running low (file handles, Erlang processes).
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        document = asdict(self)
        for d in document["destinations"]:
            d["destination"] = d.pop("name")
        return document


def management_urls(settings: Settings) -> list[str]:
    """Where the management API may be, in the order to try: the setting (comma-separated
    on a cluster), else port 15672 (15671 with TLS) on each AMQP host."""
    return [base for base, _ in _management_candidates(settings)]


def _management_candidates(settings: Settings) -> list[tuple[str, tuple[str, str]]]:
    """Each management API with the credentials to use on it: its own user info, else
    that of the AMQP URL it derives from (else the first)."""

    def auth(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return unquote(parts.username or "guest"), unquote(parts.password or "guest")

    if settings.management_url:
        fallback = auth(settings.urls[0])
        return [
            (url.rstrip("/"), auth(url) if urlsplit(url).username else fallback)
            for url in split_urls(settings.management_url)
        ]
    found: dict[str, tuple[str, str]] = {}
    for url in settings.urls:
        parts = urlsplit(url)
        scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
        found.setdefault(f"{scheme}://{parts.hostname or 'localhost'}:{port}", auth(url))
    return list(found.items())


def management_url(settings: Settings) -> str:
    """The management API to name in messages: every candidate, passwords masked."""
    return ", ".join(redact_url(url) for url in management_urls(settings))


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL (or the first of a list) names (an empty path is ``/``)."""
    path = urlsplit(split_urls(url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def management_get(settings: Settings, path: str, columns: str | None = None) -> Any:
    """GET ``/api/<path>`` from the first management API that answers 200 (None when none
    does): on a cluster, a dead node's API must not blind the tools."""
    params = {"columns": columns} if columns else None
    async with httpx.AsyncClient(timeout=5, verify=_verify(settings)) as client:
        for base, auth in _management_candidates(settings):
            try:
                response = await client.get(f"{base}/api/{path}", params=params, auth=auth)
            except httpx.HTTPError as e:
                log.debug("management API at %s: %s", redact_url(base), e)
                continue
            if response.status_code == 200:
                return response.json()
            log.debug("management API at %s: HTTP %d", redact_url(base), response.status_code)
    return None


def vhost_path(settings: Settings) -> str:
    """The vhost as one URL path segment of the management API."""
    return quote(vhost_of(settings.url), safe="")


async def _from_management(settings: Settings) -> dict[str, Counts] | None:
    columns = "name,messages_ready,messages_unacknowledged,consumers,messages,leader,members,online"
    queues = await management_get(settings, f"queues/{vhost_path(settings)}", columns)
    if queues is None:
        return None
    prefix = f"{settings.namespace}."
    return {
        q["name"]: Counts(
            q["name"],
            ready=q.get("messages_ready", q.get("messages")),
            unacked=q.get("messages_unacknowledged"),
            consumers=q.get("consumers"),
            leader=q.get("leader"),
            members=tuple(q.get("members") or ()),
            online=tuple(q.get("online") or ()),
        )
        for q in queues
        if q["name"].startswith(prefix)
    }


def _verify(settings: Settings) -> Any:
    return str(settings.tls_ca_file) if settings.tls_ca_file else True


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
    counts = await _from_management(settings)
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
    if source == "management":
        notes.append(
            "the management API samples counts every few seconds (5 s by default): they can "
            "lag the queues that much"
        )
        replicas = replica_warnings(list(counts.values()))
        # Parked and unroutable counts as the parking-lot tools see them, live.
        counts.update(await _from_amqp(settings, [names.parked, names.unroutable]))
        nodes = await management_get(
            settings, "nodes", "name,fd_used,fd_total,proc_used,proc_total"
        )
        warnings = headroom_warnings(nodes or []) + replicas
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
