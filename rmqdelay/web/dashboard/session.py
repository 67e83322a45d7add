"""Browser sessions and CSRF tokens, without server state: both are MACs under a key
derived from the API token, so every ``serve`` process with the same token accepts the
same cookie, and changing the token logs every browser out.

A cookie is ``<issued>.<nonce>.<mac>``; the CSRF token of a page is a MAC of the
cookie's nonce, so a form posted by another site (which cannot read our pages) lacks
it. Without a token (``serve`` on loopback only) the key is random per process and a
session is handed out without a login: the CSRF check still holds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

COOKIE = "rmqdelay_session"
#: How long a login lasts.
SESSION_S = 12 * 3600
_MAC_HEX = 32


@dataclass(frozen=True, slots=True)
class Session:
    """A valid session: its cookie value and the CSRF token its forms carry."""

    cookie: str
    csrf: str

    @property
    def nonce(self) -> str:
        """The cookie's random part (the access log names a session by its start)."""
        return self.cookie.split(".")[1]


class Sessions:
    """Issues and checks session cookies and their CSRF tokens."""

    def __init__(self, token: str | None) -> None:
        secret = token.encode() if token else secrets.token_bytes(32)
        self._key = hmac.new(secret, b"rmqdelay dashboard session v1", hashlib.sha256).digest()
        #: Whether a login is needed (a token is set).
        self.login_required = token is not None
        self._token = token

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]

    def issue(self, now_s: float) -> Session:
        """A new session from now."""
        body = f"{int(now_s)}.{secrets.token_hex(16)}"
        return self._session(f"{body}.{self._mac(body)}")

    def check(self, cookie: str | None, now_s: float) -> Session | None:
        """The session ``cookie`` holds, if it is ours and not expired."""
        if not cookie or len(cookie) > 200:
            return None
        issued, _, rest = cookie.partition(".")
        nonce, _, mac = rest.partition(".")
        if not issued.isdigit() or not nonce or not mac:
            return None
        if not hmac.compare_digest(mac, self._mac(f"{issued}.{nonce}")):
            return None
        if not 0 <= now_s - int(issued) < SESSION_S:
            return None
        return self._session(cookie)

    def _session(self, cookie: str) -> Session:
        return Session(cookie, self._mac(f"csrf.{cookie.split('.')[1]}"))

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        """Whether a form's CSRF field is the session's (constant time)."""
        return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())

    def token_ok(self, given: str | None) -> bool:
        """Whether ``given`` is the API token (constant time); True when none is set."""
        if self._token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self._token.encode())
