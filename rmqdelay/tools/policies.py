"""``rmqdelay declare --policies``: put the namespace's policies in force through the
management API, bringing queues made by earlier releases up to what this one creates
(``core.definitions.policies``)."""

from __future__ import annotations

from urllib.parse import quote

from rmqdelay.broker.management import management_put, vhost_of
from rmqdelay.core.definitions import policies
from rmqdelay.settings import Settings


async def apply_policies(settings: Settings) -> list[str]:
    """Create or update every policy of the namespace; their names.

    Raises:
        BrokerError: the management API is not reachable, or refused (the user needs the
            ``policymaker`` tag, or ``administrator``).
    """
    vhost = vhost_of(settings.url)
    applied = []
    for policy in policies(settings.layout, vhost):
        body = {k: policy[k] for k in ("pattern", "apply-to", "priority", "definition")}
        path = f"policies/{quote(vhost, safe='')}/{quote(policy['name'], safe='')}"
        await management_put(settings, path, body)
        applied.append(policy["name"])
    return applied
