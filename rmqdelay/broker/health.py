"""Whether a scheduler can reach its broker now, for health checks (``rmqdelay serve``'s
``/healthz``).

A robust connection never reports itself closed while it reconnects, and a link whose
peer went silent (a cut cable, a partition) looks open until heartbeats time out, a
minute or more. So a check asks two things: is the link up, and does the broker answer
one round trip within a bound. At most one round trip is in flight whatever the rate of
checks; a check that gives up on it leaves it running rather than cancelling an AMQP
call halfway.
"""

from __future__ import annotations

import asyncio
import contextlib

from rmqdelay.broker.scheduler import Scheduler

#: How long a check waits for the broker's answer before it reports the broker unreachable.
ANSWER_WITHIN_S = 2.0


class Reachability:
    """Health checks of one started Scheduler's link."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._round_trip: asyncio.Task[None] | None = None

    async def problem(self, within: float = ANSWER_WITHIN_S) -> str | None:
        """None when the broker answered within ``within`` seconds, else what is wrong
        (no host, port or user: this goes to whoever asks)."""
        if not self._scheduler.connected:
            return "the connection to the broker is down; reconnecting"
        if (alarm := await self._scheduler.alarm()) is not None:
            # A blocked connection is not read: the round trip would only time out.
            return f"the broker blocks publishing: resource alarm {alarm!r}"
        if self._round_trip is None or self._round_trip.done():
            self._round_trip = asyncio.create_task(self._scheduler.ping())
        try:
            await asyncio.wait_for(asyncio.shield(self._round_trip), within)
        except TimeoutError:
            return f"the broker did not answer within {within:g} s"
        except Exception as e:  # any failure of the link is the answer
            return f"the broker did not answer ({type(e).__name__})"
        return None

    async def close(self) -> None:
        """Stop waiting for a round trip still in flight."""
        if self._round_trip is not None and not self._round_trip.done():
            self._round_trip.cancel()
            with contextlib.suppress(BaseException):
                await self._round_trip
