"""RabbitMQ definitions (the JSON ``rabbitmqctl import_definitions`` reads) from a topology.

Pure; no I/O. It renders exactly what ``declare.py`` declares, so a broker set up by ops
from ``definitions.json`` and one set up by a client are the same broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rmqdelay.core.topology import Layout, Topology

#: A quorum work queue redelivers a message whose worker died holding it; after this many
#: deliveries the broker dead-letters it to the parking lot instead (a task that crashes
#: its worker every time must not crash the fleet forever). A policy, so ops may change it.
DEFAULT_DELIVERY_LIMIT = 20


@dataclass(frozen=True, slots=True)
class DefinitionOptions:
    """What to render besides the topology itself."""

    vhost: str = "/"
    #: Grant this user access to the namespace's objects (the user must exist; no password).
    user: str | None = None
    #: Include the recommended policies.
    policies: bool = False
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT


def permission_patterns(layout: Layout) -> dict[str, str]:
    """Configure/write/read regexes covering this namespace's objects and nothing else.

    Writing to the default exchange (``amq.default``) is how cancel records reach the stream.
    """
    own = f"^{re.escape(layout.namespace)}\\."
    return {"configure": own, "write": f"{own}|^amq\\.default$", "read": own}


def _policies(layout: Layout, options: DefinitionOptions) -> list[dict[str, Any]]:
    if layout.queue_type != "quorum":
        return []  # classic queues in 3.10 have no delivery limit
    work_queues = f"^{re.escape(layout.names.work_queue(''))}"
    return [
        {
            "vhost": options.vhost,
            "name": f"{layout.namespace}.work-delivery-limit",
            "pattern": work_queues,
            "apply-to": "queues",
            "priority": 0,
            "definition": {"delivery-limit": options.delivery_limit},
        }
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
        "policies": _policies(layout, options) if options.policies else [],
    }
    if options.user is not None:
        document["permissions"] = [
            {"user": options.user, "vhost": vhost, **permission_patterns(layout)}
        ]
    return document
