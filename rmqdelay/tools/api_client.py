"""The command line asking a running ``rmqdelay serve`` (``RMQDELAY_API_URL``): it answers
lookups from the journal it follows, where the command would read the whole journal.

Errors come back as the API's ``{"error": TYPE, "message": ...}`` and are raised again as
that rmqdelay error type, so a command fails the same way by either road.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rmqdelay.core import errors
from rmqdelay.core.errors import BrokerUnavailableError, ConfigError, RmqDelayError

#: How long one call may take (a lookup answers in well under a second; a serve that has
#: just started may need its journal read first, and then says so with a 503).
TIMEOUT_S = 30.0


class ApiClient:
    """Calls on the HTTP API at ``base_url`` with ``token`` as its bearer token."""

    def __init__(self, base_url: str, token: str | None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"RMQDELAY_API_URL must be http(s)://host:port of 'rmqdelay serve', not "
                f"{parts.scheme or 'no scheme'}://{parts.hostname or ''}"
            )
        if parts.username or parts.password:
            raise ConfigError(
                "RMQDELAY_API_URL must not hold credentials: the API takes its token from "
                "RMQDELAY_HTTP_TOKEN"
            )
        #: Shown in errors: no path or query, which a careless URL might carry secrets in.
        self.where = f"{parts.scheme}://{parts.netloc}"
        self._base = base_url.rstrip("/")
        self._token = token

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return self._call("GET", path + suffix, None)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("PATCH", path, body)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        headers = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self._base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as e:
            raise _error(e, self.where) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BrokerUnavailableError(
                f"the rmqdelay API at {self.where} (RMQDELAY_API_URL) did not answer: {reason}"
            ) from None


def _error(reply: urllib.error.HTTPError, where: str) -> RmqDelayError:
    """The rmqdelay error an API error reply stands for."""
    try:
        problem = json.loads(reply.read(65536))
        kind, message = str(problem["error"]), str(problem["message"])
    except (ValueError, KeyError, TypeError):
        kind, message = "", f"HTTP {reply.code} {reply.reason}"
    if reply.code == 401:
        return ConfigError(
            f"the rmqdelay API at {where} refused the token: set RMQDELAY_HTTP_TOKEN to the "
            "one 'rmqdelay serve' was started with"
        )
    named = getattr(errors, kind, None) or getattr(errors, f"{kind}Error", None)
    if isinstance(named, type) and issubclass(named, RmqDelayError):
        return named(message)
    if reply.code == 422:
        return errors.InvalidQueryError(message)
    return BrokerUnavailableError(f"the rmqdelay API at {where} answered: {message}")
