"""``rmqdelay destroy``: remove a namespace with everything in it.

Demos, test runs and retired deployments leave ~38 quorum queues each behind, and every
one holds broker file handles. This finds all of a namespace's objects (through the
management API when it answers, else by name), refuses while workers consume from it
unless forced, and deletes them, messages included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiormq.exceptions import ChannelNotFoundEntity

from rmqdelay.connection import connect_once
from rmqdelay.declare import delete_objects
from rmqdelay.settings import Settings
from rmqdelay.status import management_get, vhost_path

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
    queues = [
        *(names.level_queue(k) for k in range(MAX_LEVELS)),
        names.parked,
        names.unroutable,
        names.cancels,
        *(names.work_queue(d) for d in destinations),
    ]
    exchanges = [
        names.schedule_exchange,
        *(names.after_exchange(k) for k in range(MAX_LEVELS)),
        names.work_exchange,
        names.delayed_exchange,
        names.unroutable,
        names.parked,
    ]
    return queues, exchanges


async def plan_destroy(settings: Settings, destinations: list[str]) -> DestroyPlan:
    """Find the namespace's objects and who consumes from them; changes nothing."""
    prefix = f"{settings.namespace}."
    vhost = vhost_path(settings)
    queues = await management_get(
        settings, f"queues/{vhost}", "name,messages,messages_ready,consumers"
    )
    exchanges = await management_get(settings, f"exchanges/{vhost}", "name")
    if queues is not None and exchanges is not None:
        mine = [q for q in queues if q["name"].startswith(prefix)]
        return DestroyPlan(
            settings.namespace,
            sorted(q["name"] for q in mine),
            sorted(x["name"] for x in exchanges if x["name"].startswith(prefix)),
            sum(int(q.get("messages", q.get("messages_ready")) or 0) for q in mine),
            {q["name"]: q["consumers"] for q in mine if q.get("consumers")},
        )
    guessed_queues, guessed_exchanges = _guessed_names(settings, destinations)
    found: list[str] = []
    messages, consumed = 0, {}
    connection = await connect_once(settings)
    async with connection:
        channel = await connection.channel()
        for name in guessed_queues:
            try:
                ok = (await channel.declare_queue(name, passive=True)).declaration_result
            except ChannelNotFoundEntity:
                channel = await connection.channel()  # a failed passive declare closes it
                continue
            found.append(name)
            messages += ok.message_count or 0
            if ok.consumer_count:
                consumed[name] = ok.consumer_count
    return DestroyPlan(
        settings.namespace, found, guessed_exchanges, messages, consumed, listed=False
    )


async def destroy(settings: Settings, plan: DestroyPlan) -> None:
    """Delete every queue and exchange in ``plan`` (missing ones are fine)."""
    connection = await connect_once(settings)
    async with connection:
        await delete_objects(await connection.channel(), plan.queues, plan.exchanges)
