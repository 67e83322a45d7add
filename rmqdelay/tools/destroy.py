"""``rmqdelay destroy``: remove a namespace with everything in it.

Demos, test runs and retired deployments leave ~38 quorum queues each behind, and every
one holds broker file handles. This finds all of a namespace's objects (through the
management API when it answers, else by name), refuses while workers consume from it
unless forced, and deletes them, messages included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.broker.connection import connect_once
from rmqdelay.broker.declare import delete_objects
from rmqdelay.broker.management import management_get, vhost_path
from rmqdelay.settings import Settings

#: Without the management API, levels are deleted by name up to this many: more than any
#: resolution and maximum delay the settings accept can need (1 ms for 10 years is 39).
MAX_LEVELS = 64


@dataclass(frozen=True, slots=True)
class DestroyPlan:
    """What ``destroy`` would delete, and what stands in the way."""

    namespace: str
    queues: list[str]
    exchanges: list[str]
    #: Messages in those queues (None where unknown).
    messages: int | None
    #: Queues with consumers: workers still running.
    consumed: dict[str, int] = field(default_factory=dict)
    #: False when the objects were guessed by name (no management API): work queues of
    #: destinations not named were not found.
    listed: bool = True

    def describe(self) -> str:
        """One line for the confirmation prompt."""
        held = f", holding {self.messages} message(s)" if self.messages else ""
        return (
            f"namespace {self.namespace!r}: {len(self.queues)} queue(s){held} and "
            f"{len(self.exchanges)} exchange(s)"
        )


def _guessed_names(settings: Settings, destinations: list[str]) -> tuple[list[str], list[str]]:
    names = settings.names
    shards = range(settings.shards)
    queues = [
        *(names.level_queue(k, s) for s in shards for k in range(MAX_LEVELS)),
        names.parked,
        names.unroutable,
        *_streams(settings),
        *(names.work_queue(d) for d in destinations),
    ]
    exchanges = [
        *(names.schedule_exchange_of(s) for s in shards),
        *(names.after_exchange(k, s) for s in shards for k in range(MAX_LEVELS)),
        names.work_exchange,
        names.delayed_exchange,
        names.unroutable,
        names.parked,
    ]
    return queues, exchanges


def _streams(settings: Settings) -> tuple[str, ...]:
    names = settings.names
    return (
        names.cancels,
        names.cancel_snapshots,
        names.series,
        names.journal,
        names.stats,
        names.aside_log(names.parked),
        names.aside_log(names.unroutable),
    )


async def plan_destroy(settings: Settings, destinations: list[str]) -> DestroyPlan:
    """Find the namespace's objects and who consumes from them; changes nothing.

    Counts come from passive declares, live: the management API's lag a few seconds, and a
    worker that started just now must not be missed.
    """
    prefix = f"{settings.namespace}."
    vhost = vhost_path(settings)
    listed_queues = await management_get(settings, f"queues/{vhost}", "name")
    listed_exchanges = await management_get(settings, f"exchanges/{vhost}", "name")
    listed = listed_queues is not None and listed_exchanges is not None
    if listed:
        queues = sorted(q["name"] for q in listed_queues if q["name"].startswith(prefix))
        exchanges = sorted(x["name"] for x in listed_exchanges if x["name"].startswith(prefix))
    else:
        queues, exchanges = _guessed_names(settings, destinations)
    found: list[str] = []
    messages, consumed, streams = 0, {}, _streams(settings)
    connection = await connect_once(settings)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            try:
                ok = (await channel.declare_queue(name, passive=True)).declaration_result
            except ChannelNotFoundEntity:
                channel = await connection.channel()  # a failed passive declare closes it
                continue
            found.append(name)
            if name not in streams:  # a stream's records are a log, not tasks waiting
                messages += ok.message_count or 0
            if ok.consumer_count:
                consumed[name] = ok.consumer_count
    return DestroyPlan(settings.namespace, found, exchanges, messages, consumed, listed)


async def destroy(settings: Settings, plan: DestroyPlan) -> None:
    """Delete every queue and exchange in ``plan`` (missing ones are fine)."""
    connection = await connect_once(settings)
    async with connection:
        await delete_objects(await connection.channel(), plan.queues, plan.exchanges)
