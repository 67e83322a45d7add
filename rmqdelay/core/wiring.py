"""What a client derives from its settings once the backend is known. Pure; no I/O.

``Settings`` reads the environment; a ``Wiring`` is computed from it once (per layout and
limits), after ``auto`` has been resolved to a backend, and then carries the layout,
object names and limits that every publish and delivery consults, instead of each call
rebuilding them from ``Settings``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from rmqdelay.core.delays import DelayLimits
from rmqdelay.core.names import Names
from rmqdelay.core.routes import Backend, Route, route, shard_of
from rmqdelay.core.topology import Layout


@dataclass(frozen=True, slots=True)
class Wiring:
    """Layout, names and limits of one client, fixed for its lifetime."""

    layout: Layout
    limits: DelayLimits
    names: Names
    #: Largest body the broker takes (RMQDELAY_MAX_MESSAGE_SIZE), checked before sending.
    max_message_size: int
    #: Tasks due within the hold window are journaled too (RMQDELAY_JOURNAL_SOON).
    journal_soon: bool = False

    @property
    def backend(self) -> Backend:
        """The resolved backend (never ``auto``)."""
        return self.layout.backend

    def route(self, wait_us: int, task_id: str = "") -> Route:
        """How to publish task ``task_id`` due ``wait_us`` from now (refusing what the
        backend cannot hold)."""
        shard = shard_of(task_id, self.layout.shards)
        return route(
            self.layout.backend,
            self.names,
            self.limits,
            wait_us,
            shard,
            journal_soon=self.journal_soon,
        )


@functools.lru_cache(maxsize=64)
def wiring(
    layout: Layout, limits: DelayLimits, max_message_size: int, journal_soon: bool = False
) -> Wiring:
    """The (shared) wiring for a layout and its limits."""
    return Wiring(layout, limits, layout.names, max_message_size, journal_soon and layout.journal)
