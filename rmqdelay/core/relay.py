"""Messages that pass through rmqdelay on their way somewhere else.

``rmqdelay bridge`` takes messages published as to the delayed-message plugin (with an
``x-delay`` header) and schedules them; ``rmqdelay consume --forward`` (which the bridge
runs too) publishes each task, when due, to an exchange of the user's. What the levels
would change or drop on the way (the routing key, a per-message TTL, the delivery mode,
``x-delay``) travels in headers of ours, and the forwarder puts it back; headers of ours
never leave with the message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from rmqdelay.core.errors import InvalidDelayError
from rmqdelay.core.wire import strip_broker_headers

X_DELAY = "x-delay"
#: The plugin's timer limit (Erlang's): a longer x-delay, or none above 0, it routes at once.
PLUGIN_MAX_DELAY_MS = 2**32 - 1
ROUTING_KEY = "rmqdelay-forward-routing-key"
EXPIRATION = "rmqdelay-forward-expiration"
DELIVERY_MODE = "rmqdelay-forward-delivery-mode"
REQUESTED_DELAY = "rmqdelay-forward-x-delay"
_OURS = "rmqdelay-"


def plugin_delay_ms(headers: Mapping[str, Any] | None) -> int:
    """The delay in milliseconds a message asks for, read as the plugin reads ``x-delay``:
    integers, decimal strings, floats truncated; none, zero or negative means now.

    Raises:
        InvalidDelayError: an ``x-delay`` no reading makes a number of (the plugin would
            fail the publish), naming it.
    """
    value = (headers or {}).get(X_DELAY)
    if value is None:
        return 0
    delay: int
    if isinstance(value, bool):
        raise InvalidDelayError(f"x-delay is {value!r}, not a number of milliseconds")
    if isinstance(value, int):
        delay = value
    elif isinstance(value, float | Decimal):
        if not math.isfinite(value):
            raise InvalidDelayError(f"x-delay is {value!r}, not a number of milliseconds")
        delay = int(value)
    elif isinstance(value, str | bytes):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        try:
            delay = int(text.strip())
        except ValueError:
            raise InvalidDelayError(
                f"x-delay is {text[:50]!r}, not a whole number of milliseconds"
            ) from None
    else:
        raise InvalidDelayError(
            f"x-delay is a {type(value).__name__} ({str(value)[:50]}), not a number of milliseconds"
        )
    return max(delay, 0)


def bridged_headers(
    headers: Mapping[str, Any] | None,
    *,
    routing_key: str,
    expiration: str | None,
    delivery_mode: int | None,
    delay_ms: int,
) -> dict[str, Any]:
    """The publisher's headers for the trip through the levels: without ``x-delay`` (the
    plugin backend routes on it) or anything posing as ours, plus what the forwarder needs
    to restore."""
    kept = {
        k: v
        for k, v in strip_broker_headers(headers or {}).items()
        if k != X_DELAY and not k.startswith(_OURS)
    }
    kept[ROUTING_KEY] = routing_key
    kept[REQUESTED_DELAY] = delay_ms
    if expiration is not None:
        kept[EXPIRATION] = expiration
    if delivery_mode is not None:
        kept[DELIVERY_MODE] = delivery_mode
    return kept


def forwarded_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The headers a forwarded message leaves with: the publisher's own, none of ours or
    of the levels' dead-lettering; a bridged message's ``x-delay`` comes back negated, as
    the plugin hands it to consumers (so they can tell the message was delayed)."""
    headers = headers or {}
    out = {k: v for k, v in strip_broker_headers(headers).items() if not k.startswith(_OURS)}
    requested = headers.get(REQUESTED_DELAY)
    if isinstance(requested, int) and not isinstance(requested, bool) and requested > 0:
        out[X_DELAY] = -requested
    return out


def forward_routing_key(headers: Mapping[str, Any] | None, default: str) -> str:
    """The routing key to forward with: a bridged message's original one, else ``default``."""
    value = (headers or {}).get(ROUTING_KEY)
    return value if isinstance(value, str) else default


def restored_expiration(headers: Mapping[str, Any] | None) -> str | None:
    """A bridged message's per-message TTL, kept out of the levels (where it would expire
    the message early) and put back on the way out."""
    value = (headers or {}).get(EXPIRATION)
    return value if isinstance(value, str) else None


def restored_delivery_mode(headers: Mapping[str, Any] | None) -> int | None:
    """A bridged message's own delivery mode (the levels keep every message persistent)."""
    value = (headers or {}).get(DELIVERY_MODE)
    return value if type(value) is int and value in (1, 2) else None
