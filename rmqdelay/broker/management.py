"""The RabbitMQ management API, as the tools read it: where it is, with which credentials,
and one GET that tries every node's API in turn (on a cluster, a dead node's API must not
blind the tools). Read-only apart from ``management_put``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httpx

from rmqdelay.core.errors import BrokerError
from rmqdelay.core.redact import redact_url, split_urls
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)


def management_urls(settings: Settings) -> list[str]:
    """Where the management API may be, in the order to try: the setting (comma-separated
    on a cluster), else port 15672 (15671 with TLS) on each AMQP host."""
    return list(dict.fromkeys(base for base, _ in _management_candidates(settings)))


def _management_candidates(settings: Settings) -> list[tuple[str, tuple[str, str]]]:
    """Each management API with credentials to try on it: its own user info, else those of
    each AMQP URL in turn (a list's first node may be a dead one with other credentials)."""

    def auth(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return unquote(parts.username or "guest"), unquote(parts.password or "guest")

    amqp_auths = list(dict.fromkeys(auth(url) for url in settings.urls))
    if settings.management_url:
        return [
            (base, credentials)
            for url in split_urls(settings.management_url)
            for base in (url.rstrip("/"),)
            for credentials in ([auth(url)] if urlsplit(url).username else amqp_auths)
        ]
    found: dict[str, tuple[str, str]] = {}
    for url in settings.urls:
        parts = urlsplit(url)
        scheme, port = ("https", 15671) if parts.scheme == "amqps" else ("http", 15672)
        found.setdefault(f"{scheme}://{parts.hostname or 'localhost'}:{port}", auth(url))
    return list(found.items())


def management_url(settings: Settings) -> str:
    """The management API to name in messages: every candidate, passwords masked."""
    return ", ".join(redact_url(url) for url in management_urls(settings))


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL (or the first of a list) names (an empty path is ``/``)."""
    path = urlsplit(split_urls(url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def _answers(
    settings: Settings, method: str, path: str, **request: Any
) -> AsyncIterator[httpx.Response]:
    """``method /api/<path>`` on each management API in turn, with each set of credentials
    to try there, skipping an API that did not answer at all: each answer, until the
    caller has the one it wants."""
    unreachable: set[str] = set()
    async with httpx.AsyncClient(timeout=5, verify=_verify(settings)) as client:
        for base, auth in _management_candidates(settings):
            if base in unreachable:
                continue
            try:
                response = await client.request(method, f"{base}/api/{path}", auth=auth, **request)
            except httpx.HTTPError as e:
                log.debug("management API at %s: %s", redact_url(base), e)
                unreachable.add(base)
                continue
            log.debug("management API at %s: HTTP %d", redact_url(base), response.status_code)
            yield response


async def management_get(settings: Settings, path: str, columns: str | None = None) -> Any:
    """GET ``/api/<path>`` from the first management API that answers 200 (None when none
    does): on a cluster, a dead node's API must not blind the tools."""
    params = {"columns": columns} if columns else None
    async for response in _answers(settings, "GET", path, params=params):
        if response.status_code == 200:
            return response.json()
    return None


def vhost_path(settings: Settings) -> str:
    """The vhost as one URL path segment of the management API."""
    return quote(vhost_of(settings.url), safe="")


def _verify(settings: Settings) -> Any:
    return str(settings.tls_ca_file) if settings.tls_ca_file else True


async def management_put(settings: Settings, path: str, body: dict[str, Any]) -> None:
    """PUT ``body`` to ``/api/<path>`` on the first management API that takes it.

    Raises:
        BrokerError: none answered, or the broker refused (the reason it gave).
    """
    refusals: list[str] = []
    async for response in _answers(settings, "PUT", path, json=body, timeout=10):
        if response.status_code in (200, 201, 204):
            return
        refusals.append(f"HTTP {response.status_code}: {_reason(response)}")
    why = "; ".join(dict.fromkeys(refusals)) or "no management API answered"
    raise BrokerError(f"could not PUT /api/{path} through {management_url(settings)}: {why}")


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("reason", response.text))[:300]
    except ValueError:
        return response.text[:300]


async def namespace_depths(settings: Settings, *kinds: str) -> dict[str, int]:
    """Messages in each non-empty queue of ``settings``' namespace, by name (only those
    named ``<namespace>.<kind>...`` for the ``kinds`` given, e.g. "level.", "work."); empty
    without a management API. For telling where tasks wait when they do not arrive."""
    queues = await management_get(settings, f"queues/{vhost_path(settings)}", "name,messages")
    prefixes = tuple(f"{settings.namespace}.{kind}" for kind in kinds or ("",))
    return {
        q["name"]: q["messages"]
        for q in queues or []
        if q["name"].startswith(prefixes) and q.get("messages")
    }
