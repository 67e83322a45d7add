"""``rmqdelay status``: what is pending where, read from the broker without changing it.

Counts come from the management API when it answers (it alone knows unacked counts and can
list the destinations); otherwise from passive declares over AMQP, which give ready
messages and consumers of queues named in advance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx
from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.connection import connect_once
from rmqdelay.delays import level_ttl_ms
from rmqdelay.settings import Settings

log = logging.getLogger("rmqdelay.status")


@dataclass(frozen=True, slots=True)
class Counts:
    """One queue's counts; None where the source cannot tell (or the queue is missing)."""

    name: str
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    exists: bool = True

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
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        document = asdict(self)
        for d in document["destinations"]:
            d["destination"] = d.pop("name")
        return document


def management_url(settings: Settings) -> str:
    """Where the management API is: the setting, else port 15672 (15671 with TLS) on the
    AMQP host."""
    if settings.management_url:
        return settings.management_url.rstrip("/")
    parts = urlsplit(settings.url)
    scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
    return f"{scheme}://{parts.hostname or 'localhost'}:{port}"


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names (an empty path is ``/``)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def _from_management(settings: Settings) -> dict[str, Counts] | None:
    parts = urlsplit(settings.url)
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    url = f"{management_url(settings)}/api/queues/{quote(vhost_of(settings.url), safe='')}"
    columns = "name,messages_ready,messages_unacknowledged,consumers,messages"
    try:
        async with httpx.AsyncClient(auth=auth, timeout=5, verify=_verify(settings)) as client:
            response = await client.get(url, params={"columns": columns})
    except httpx.HTTPError as e:
        log.debug("management API at %s: %s", management_url(settings), e)
        return None
    if response.status_code != 200:
        log.debug("management API at %s: HTTP %d", management_url(settings), response.status_code)
        return None
    prefix = f"{settings.namespace}."
    return {
        q["name"]: Counts(
            q["name"],
            ready=q.get("messages_ready", q.get("messages")),
            unacked=q.get("messages_unacknowledged"),
            consumers=q.get("consumers"),
        )
        for q in response.json()
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


async def collect(settings: Settings, destinations: list[str]) -> Status:
    """A snapshot of ``settings``' namespace (all destinations, or those named)."""
    names = settings.names
    backend = settings.backend
    if backend == "auto":  # as a client would resolve it, but without declaring anything
        backend = "plugin" if await _plugin_exchange_exists(settings) else "levels"
    levels = [] if backend == "plugin" else [names.level_queue(k) for k in range(settings.levels)]
    fixed = [*levels, names.parked, names.unroutable, names.cancels]
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
    missing = Counts("", exists=False)

    def of(name: str) -> Counts:
        return counts.get(name, missing)

    return Status(
        namespace=settings.namespace,
        vhost=vhost_of(settings.url),
        backend=backend,
        source=source,
        levels=[
            Level(k, level_ttl_ms(k, settings.resolution_ms), of(name).total, of(name).exists)
            for k, name in enumerate(levels)
        ],
        destinations=[replace(of(names.work_queue(d)), name=d) for d in wanted],
        parked=of(names.parked).total,
        unroutable=of(names.unroutable).total,
        cancel_records=of(names.cancels).ready,
        notes=notes,
    )


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(status: Status) -> str:
    """The one-screen text form."""
    lines = [
        f"namespace {status.namespace}  vhost {status.vhost}  backend {status.backend}  "
        f"(counts from {status.source})",
        "",
    ]
    if status.levels:
        lines.append(f"{'level':<7}{'ttl':>14}{'pending':>10}")
        for lv in status.levels:
            pending = _n(lv.pending) if lv.exists else "MISSING"
            lines.append(f"{lv.level:<7}{_ttl(lv.ttl_ms):>14}{pending:>10}")
        total = sum(lv.pending or 0 for lv in status.levels)
        lines += [f"{'all':<7}{'':>14}{total:>10}", ""]
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
    return "\n".join(lines)


def _ttl(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:.4g}{unit}"
    return f"{ms}ms"
