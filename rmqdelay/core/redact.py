"""Keeping secrets out of logs, errors and headers. Pure; no I/O.

Two kinds of secret pass through rmqdelay: the broker password in ``RMQDELAY_URL``, and
webhook URLs, whose credentials, path and query often *are* the token (chat-robot hooks).
Our own messages show only the safe forms below; ``Redactor`` is the net under third-party
libraries' log lines.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

MASK = "******"
#: Shorter strings are not masked in log text: masking every "pw" would garble the logs,
#: and a secret that short guards nothing.
MIN_SECRET_LEN = 4


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, userinfo, rest)`` split at the *last* '@' after the scheme, or None.

    Not urlsplit: a password holding an unencoded '#', '/', '?' or '[' makes it cut the
    URL in the middle of the password (or raise), and the redacted URL would show the
    rest of it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at < 0:
        return None
    return scheme + sep, rest[:at], rest[at + 1 :]


#: Where one URL of a comma-separated list ends: a comma before the next URL's scheme. Not
#: every comma: RFC 3986 lets a password hold one unencoded.
_NEXT_URL = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(value: str) -> list[str]:
    """The URLs of a comma-separated list (one URL is a list of one). A trailing comma is
    a list's, not the vhost's (a vhost ending in ',' is written %2C)."""
    return [part for part in _NEXT_URL.split(value.strip().rstrip(", ")) if part]


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with every password replaced, whatever
    characters it holds."""
    many = split_urls(url)
    if len(many) > 1:
        return ",".join(redact_url(one) for one in many)
    parts = _userinfo(url)
    if parts is None:
        return url
    start, userinfo, rest = parts
    user, colon, _ = userinfo.partition(":")
    return f"{start}{user}:{MASK}@{rest}" if colon else url


def userinfo(url: str) -> str | None:
    """The ``user:password`` part of a URL as written (None when there is none)."""
    parts = _userinfo(url)
    return parts[1] if parts else None


def url_password(url: str) -> str | None:
    """The password part of a URL as written (None when there is none)."""
    found = userinfo(url)
    if found is None:
        return None
    _, colon, password = found.partition(":")
    return password if colon else None


def safe_webhook_url(url: str) -> str:
    """``scheme://host[:port]/...``: webhook paths and queries carry tokens as often as
    their user info does, so only where the hook lives is shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a webhook URL that does not parse)"
    hidden = "/..." if parts.path.strip("/") or parts.query or parts.username else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def webhook_secrets(url: str) -> list[str]:
    """The parts of a webhook URL to mask wherever they appear."""
    parts = urlsplit(url)
    found = [url, parts.path, parts.query, parts.password or "", parts.username or ""]
    found += [unquote(p) for p in found] + [quote(p, safe="/") for p in found]
    return [p for p in found if p.strip("/")]


#: A URL in free text (an exception message, say): a scheme, then up to the next blank,
#: quote, angle bracket or parenthesis (square brackets belong to IPv6 hosts).
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>(){}]+")
#: Schemes whose path names no secret (an AMQP URL's path is the vhost).
_PATH_SAFE = ("amqp", "amqps")


def _safe_url_in_text(found: re.Match[str]) -> str:
    url = found.group(0)
    parts = _userinfo(url)
    if parts is not None:
        start, info, rest = parts
        user, colon, _ = info.partition(":")
        # user:password -> user:******; a bare user part is as often a token itself.
        url = f"{start}{user}:{MASK}@{rest}" if colon else f"{start}{MASK}@{rest}"
    scheme, sep, rest = url.partition("://")
    if scheme.lower() in _PATH_SAFE:
        return url
    where, slash, path = rest.partition("/")
    where, question, _ = where.partition("?")
    hidden = "/..." if (slash and path.strip("/")) or question else ""
    return f"{scheme}{sep}{where}{hidden}"


def redact_urls(text: str) -> str:
    """``text`` with every URL in it made safe to show: passwords and bare user parts
    masked, and (but for AMQP URLs, whose path is the vhost) path and query hidden, where
    hooks and APIs carry their tokens."""
    return _URL_IN_TEXT.sub(_safe_url_in_text, text) if "://" in text else text


def without_urls(text: str, instead: str) -> str:
    """``text`` with every URL in it replaced by ``instead`` (for answers to strangers)."""
    return _URL_IN_TEXT.sub(instead, text) if "://" in text else text


class Redactor:
    """Replaces known secrets in text, longest first (a URL before the path inside it),
    then makes every URL left in it safe (``redact_urls``): the rules for log lines and
    for what is stored where operators read it (parked reasons)."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self._secrets: list[str] = []
        self.add(*(secrets or []))

    def add(self, *secrets: str) -> None:
        """Mask these too (those shorter than MIN_SECRET_LEN are ignored)."""
        known = set(self._secrets) | {s for s in secrets if len(s) >= MIN_SECRET_LEN}
        self._secrets = sorted(known, key=len, reverse=True)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What is masked, longest first."""
        return tuple(self._secrets)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return redact_urls(text)
