"""Resource alarms: RabbitMQ blocks publishing connections while a node is short of disk
or memory, and says so with ``connection.blocked``.

A blocked connection is not read by the broker: a publish written to it waits, unconfirmed,
for as long as the alarm lasts, and heartbeats still flow, so nothing looks broken. aiormq
logs the frame and keeps no public record of it; this module keeps one per connection, so
that a publish can wait for the alarm to clear (up to its deadline) without writing
anything, and then fail naming the alarm.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: aiormq's (name-mangled) handlers of the two frames, looked up on the instance by its
#: reader; tests/unit/test_alarms.py fails if an aiormq upgrade renames them.
_ON_BLOCKED = "_Connection__handle_connection_blocked"
_ON_UNBLOCKED = "_Connection__handle_connection_unblocked"

#: What to do about each alarm, by the reason RabbitMQ gives.
_ADVICE = {
    "low on disk": "free disk space on the broker's node (or lower its disk_free_limit)",
    "low on memory": (
        "the broker's node is over its vm_memory_high_watermark: drain or shrink queues, "
        "or give the node more memory"
    ),
}


@dataclass(frozen=True, slots=True)
class Alarm:
    """Why and since when the broker blocks a connection."""

    reason: str
    #: time.monotonic() and time.time() when the frame arrived.
    since: float
    since_wall: float

    def describe(self) -> str:
        """One phrase: the alarm, how long ago it began, and what to do."""
        advice = _ADVICE.get(self.reason, "see the broker's log for the alarm")
        age = time.monotonic() - self.since
        return f"resource alarm {self.reason!r} (for {age:.1f}s); {advice}"


class _State:
    __slots__ = ("alarm", "cleared")

    def __init__(self) -> None:
        self.alarm: Alarm | None = None
        self.cleared = asyncio.Event()
        self.cleared.set()


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def watch(connection: Any) -> bool:
    """Track ``connection.blocked``/``unblocked`` on one aiormq connection (call it once
    per underlying connection: each reconnect makes a new one). False if this aiormq has
    no such handlers, in which case a blocked publish fails as an unconfirmed one."""
    if connection in _STATES:
        return True
    on_blocked = getattr(connection, _ON_BLOCKED, None)
    on_unblocked = getattr(connection, _ON_UNBLOCKED, None)
    if on_blocked is None or on_unblocked is None:
        log.debug("aiormq has no blocked-connection handlers; resource alarms go unnamed")
        return False
    state = _STATES[connection] = _State()

    async def blocked(frame: Any) -> None:
        reason = str(getattr(frame, "reason", "") or "unknown")
        state.alarm = Alarm(reason, time.monotonic(), time.time())
        state.cleared.clear()
        await on_blocked(frame)

    async def unblocked(frame: Any) -> None:
        if state.alarm is not None:
            log.info("the broker cleared %r after %.1fs", state.alarm.reason, _age(state.alarm))
        state.alarm = None
        state.cleared.set()
        await on_unblocked(frame)

    _install(connection, _ON_BLOCKED, blocked)
    _install(connection, _ON_UNBLOCKED, unblocked)
    return True


def _install(connection: Any, name: str, handler: Callable[[Any], Awaitable[None]]) -> None:
    setattr(connection, name, handler)


def _age(alarm: Alarm) -> float:
    return time.monotonic() - alarm.since


def alarm_of(connection: Any) -> Alarm | None:
    """The alarm blocking ``connection`` now, or None."""
    state = _STATES.get(connection)
    return None if state is None else state.alarm


async def cleared(connection: Any, within: float) -> bool:
    """Wait up to ``within`` seconds for ``connection``'s alarm to clear; True once it is
    clear (at once if it is not blocked)."""
    state = _STATES.get(connection)
    if state is None or state.cleared.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, within)):
            await state.cleared.wait()
    except TimeoutError:
        return False
    return True
