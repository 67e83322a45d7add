"""RabbitMQ definitions (the JSON ``rabbitmqctl import_definitions`` reads) from a topology.

Pure; no I/O. It renders exactly what ``declare.py`` declares, so a broker set up by ops
from ``definitions.json`` and one set up by a client are the same broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rmqdelay.core.topology import UNLIMITED_DELIVERIES, Layout, Topology


@dataclass(frozen=True, slots=True)
class DefinitionOptions:
    """What to render besides the topology itself."""

    vhost: str = "/"
    #: Grant this user access to the namespace's objects (the user must exist; no password).
    user: str | None = None
    #: Include the policies that bring queues made by earlier releases up to this one.
    policies: bool = False


def permission_patterns(layout: Layout) -> dict[str, str]:
    """Configure/write/read regexes covering this namespace's objects and nothing else.

    Writing to the default exchange (``amq.default``) is how cancel records reach the stream.
    """
    own = f"^{re.escape(layout.namespace)}\\."
    return {"configure": own, "write": f"{own}|^amq\\.default$", "read": own}


def policies(layout: Layout, vhost: str) -> list[dict[str, Any]]:
    """Policies giving queues what this release creates them with, for queues made by
    earlier releases (the broker never adds an argument to a queue that exists).

    Quorum queues only (classic queues have no delivery limit): the work queues' delivery
    limit (``Layout.delivery_limit``, which RabbitMQ 4.x would otherwise put at 20 and 3.x
    leave unlimited), and no limit that could drop a message from the queues with nowhere
    to dead-letter to (parking lot, unroutable queue, bridge intakes). Where a queue's
    argument and a policy both set a limit, the broker applies the lower one.
    """
    if layout.queue_type != "quorum":
        return []
    names = layout.names
    aside = (
        f"^({re.escape(names.parked)}|{re.escape(names.unroutable)})$"
        f"|^{re.escape(names.bridge_intake(''))}"
    )
    return [
        {
            "vhost": vhost,
            "name": f"{layout.namespace}.work-delivery-limit",
            "pattern": f"^{re.escape(names.work_queue(''))}",
            "apply-to": "queues",
            "priority": 0,
            "definition": {"delivery-limit": layout.delivery_limit},
        },
        {
            "vhost": vhost,
            "name": f"{layout.namespace}.aside-delivery-limit",
            "pattern": aside,
            "apply-to": "queues",
            "priority": 0,
            "definition": {"delivery-limit": UNLIMITED_DELIVERIES},
        },
    ]


def render_definitions(
    layout: Layout, topology: Topology, options: DefinitionOptions | None = None
) -> dict[str, Any]:
    """The definitions document for ``topology`` in ``options.vhost``."""
    options = options or DefinitionOptions()
    vhost = options.vhost
    document: dict[str, Any] = {
        "vhosts": [{"name": vhost}],
        "exchanges": [
            {
                "name": x.name,
                "vhost": vhost,
                "type": x.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": dict(x.arguments),
            }
            for x in topology.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": q.creation_arguments,
            }
            for q in topology.queues
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": vhost,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": dict(b.arguments),
            }
            for b in topology.bindings
        ],
        "policies": policies(layout, vhost) if options.policies else [],
    }
    if options.user is not None:
        document["permissions"] = [
            {"user": options.user, "vhost": vhost, **permission_patterns(layout)}
        ]
    return document
