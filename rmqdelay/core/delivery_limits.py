"""Which delivery limit a quorum queue has, by RabbitMQ version, and where one could drop
a message. Pure; no I/O (``rmqdelay status`` feeds it what the management API says).

What the versions do, measured (docs/design.md, "RabbitMQ 4.x"):

- 3.x: no limit unless an argument or policy sets one; every return counts.
- 4.0-4.2: a limit of 20 unless one is set (-1: none); every acquisition counts,
  ``basic.get`` included.
- 4.3: the same default; a reject or a closed channel counts, a nack does not. The
  management API reports the limit in force (``delivery_limit``).

Where an argument and a policy both set one, the broker applies the lower. At the limit
a message is dead-lettered, or dropped when the queue has nowhere to dead-letter to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rmqdelay.core.topology import DELIVERY_LIMIT, UNLIMITED_DELIVERIES

#: RabbitMQ 4.x's limit for a quorum queue that sets none.
DEFAULT_LIMIT_4X = 20


def parse_version(text: object) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``4.3.6`` (None if it is not one)."""
    parts = str(text).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def effective_limit(queue: Mapping[str, Any], version: tuple[int, int] | None) -> int | None:
    """The delivery limit in force on ``queue`` (a management API queue object), None for
    no limit (classic queues, streams, and 3.x quorum queues that set none).

    ``version`` is the broker's; unknown, it is taken for 4.x (the safer guess: a limit).
    """
    if queue.get("type", "quorum") != "quorum":
        return None
    reported = queue.get("delivery_limit")  # 4.3: what is in force
    if reported == "unlimited":
        return None
    if (value := _int(reported)) is not None:
        return value
    arguments = queue.get("arguments") or {}
    policy = queue.get("effective_policy_definition") or {}
    set_ = [
        v
        for v in (_int(arguments.get(DELIVERY_LIMIT)), _int(policy.get("delivery-limit")))
        if v is not None
    ]
    if version is not None and version < (4, 0):
        # 3.x has no "none" value: a negative limit drops a message at its first return.
        return max(min(set_), 0) if set_ else None
    if not set_:
        return DEFAULT_LIMIT_4X
    limits = [v for v in set_ if v >= 0]
    return min(limits) if limits else None


@dataclass(frozen=True, slots=True)
class LimitTrouble:
    """A queue whose delivery limit is not what rmqdelay relies on."""

    queue: str
    #: What is wrong, the same words for every queue with the same trouble.
    trouble: str


def limit_troubles(
    queues: Sequence[Mapping[str, Any]],
    version: tuple[int, int] | None,
    *,
    aside: set[str],
    aside_prefix: str,
    work_prefix: str,
    work_limit: int,
) -> list[LimitTrouble]:
    """Queues that could drop a message (``aside``, and names starting with
    ``aside_prefix``: queues with nowhere to dead-letter to) or whose workers' deaths are
    not counted as the settings say (names starting with ``work_prefix``)."""
    how = (
        "every look at it (rmqdelay parked/unroutable) counts"
        if version is not None and version < (4, 3)
        else "every look that ends with a lost channel, and every rejected return, counts"
    )
    found: list[LimitTrouble] = []
    for queue in queues:
        name = str(queue.get("name", ""))
        limit = effective_limit(queue, version)
        if name in aside or name.startswith(aside_prefix):
            if limit is not None and limit < UNLIMITED_DELIVERIES:
                found.append(
                    LimitTrouble(
                        name,
                        f"delivery limit {limit} and nowhere to dead-letter to: the broker "
                        f"drops a message returned that often, and {how}; apply the "
                        "namespace's policies ('rmqdelay declare --policies')"
                        + _policy_note(queue),
                    )
                )
        elif name.startswith(work_prefix) and limit != work_limit:
            what = "no delivery limit" if limit is None else f"delivery limit {limit}"
            found.append(
                LimitTrouble(
                    name,
                    f"{what}, not RMQDELAY_DELIVERY_LIMIT={work_limit}: a task whose workers "
                    "keep dying is "
                    + ("redelivered forever" if limit is None else f"parked after {limit}")
                    + "; apply the namespace's policies ('rmqdelay declare --policies')"
                    + _policy_note(queue),
                )
            )
    return found


def _policy_note(queue: Mapping[str, Any]) -> str:
    """Which policy holds the queue, when it is not one of ours (it wins over ours)."""
    policy = queue.get("policy")
    operator = queue.get("operator_policy")
    held = [f"policy {p!r}" for p in (policy,) if p and not str(p).endswith("-delivery-limit")]
    held += [f"operator policy {operator!r}"] if operator else []
    return f" (held by {' and '.join(held)}, which may set it)" if held else ""
