"""Where a task goes to wait: through the TTL levels, or into the delayed-message plugin.

Pure; no I/O. Both backends end in the same work exchange with the same rmqdelay headers,
so workers, cancels and the parking lot do not care which one carried a task.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from rmqdelay.core.delays import DelayLimits, describe_us, hop_plan
from rmqdelay.core.errors import InvalidDelayError
from rmqdelay.core.names import Names
from rmqdelay.core.wire import route_headers

Backend: TypeAlias = Literal["levels", "plugin"]

#: Header the delayed-message plugin reads, in milliseconds.
X_DELAY = "x-delay"
#: The plugin keeps x-delay in an unsigned 32-bit field: a longer delay wraps around and
#: the message is delivered at once, so it must be refused.
PLUGIN_MAX_DELAY_MS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Route:
    """How to publish one task so that it reaches its work queue after its delay."""

    exchange: str
    #: Read-only: routes are cached and shared; copy these into a message's headers.
    headers: Mapping[str, Any]
    #: The plugin answers every delayed publish with basic.return (NO_ROUTE) at once, so
    #: mandatory would turn every task into a false "unroutable" (docs/design.md).
    mandatory: bool
    hops: int


def shard_of(task_id: str, shards: int) -> int:
    """The level set a task waits in: CRC-32 of its id (UTF-8) modulo the shard count.

    Any shard delivers a task correctly; hashing the id spreads the load evenly and puts a
    rescheduled task where the first one went. CRC-32 so other languages compute the same.
    """
    return zlib.crc32(task_id.encode()) % shards if shards > 1 else 0


def route(
    backend: Backend,
    names: Names,
    limits: DelayLimits,
    wait_us: int,
    shard: int = 0,
    *,
    journal_soon: bool = False,
) -> Route:
    """The route for a task due ``wait_us`` from now (0 or less: at once), through the
    levels of ``shard``; with ``journal_soon``, a task due within the hold window goes
    through the schedule exchange too, so that the journal gets its copy.

    Raises:
        InvalidDelayError: over the configured maximum, or over the plugin's.
    """
    wait_us = max(0, wait_us)
    if backend == "levels":
        units = limits.whole_units(wait_us)
        # No level to visit: straight into the work exchange (direct, keyed by the
        # destination), not through the schedule exchange's headers match and the
        # exchange-to-exchange binding behind it, which cost the broker for nothing. Such a
        # task is due within the hold window, so it is not journaled either: copying it
        # there cost 27-47 % of the schedule rate on 4.3 (docs/design.md, "The journal").
        first = names.schedule_exchange_of(shard) if units or journal_soon else names.work_exchange
        return _levels_route(first, units)
    limits.units(wait_us)  # the configured maximum holds for both backends
    ms = -(-wait_us // 1000)
    if ms > PLUGIN_MAX_DELAY_MS:
        raise InvalidDelayError(
            f"delay of {describe_us(wait_us)} is longer than the delayed-message plugin can "
            f"hold ({PLUGIN_MAX_DELAY_MS} ms, about 49.7 days; it would deliver at once): use "
            "RMQDELAY_BACKEND=levels for longer delays"
        )
    return Route(names.delayed_exchange, {X_DELAY: ms}, False, 1 if ms else 0)


@functools.lru_cache(maxsize=4096)
def _levels_route(exchange: str, units: int) -> Route:
    """Every task of the same whole units takes the same route: build it once (loads
    repeat a few delays; building the plan was the scheduler's largest cost per task)."""
    plan = hop_plan(units)
    return Route(exchange, MappingProxyType(route_headers(plan)), True, len(plan))
