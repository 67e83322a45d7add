"""The built-in handler that POSTs each task to a URL (``rmqdelay consume --webhook URL``)."""

from __future__ import annotations

import base64
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

import httpx

from rmqdelay.core.errors import ConfigError, WebhookError
from rmqdelay.core.redact import Redactor, safe_webhook_url, webhook_secrets
from rmqdelay.core.task import Task


def task_document(task: Task) -> dict[str, Any]:
    """The JSON body of a webhook call."""
    document: dict[str, Any] = {
        "id": task.id,
        "destination": task.destination,
        "due_at": task.due_at.isoformat(),
        "attempt": task.attempt,
        "keys": list(task.keys),
    }
    if isinstance(task.payload, bytes):
        document["payload_base64"] = base64.b64encode(task.payload).decode()
        document["content_type"] = task.content_type
    else:
        document["payload"] = task.payload
    return document


class WebhookHandler:
    """POST each task as JSON; anything but a 2xx answer in time fails the attempt.

    The task id goes in an ``Idempotency-Key`` header: retries and redeliveries can POST the
    same task more than once. Use as ``async with WebhookHandler(url) as handler: ...``.
    """

    def __init__(self, url: str, *, timeout: timedelta = timedelta(seconds=10)) -> None:
        #: Where the hook lives, without credentials, path or query: for logs and errors.
        self.safe_url = safe_webhook_url(url)
        try:
            self.url = httpx.URL(url)
        except httpx.InvalidURL:
            raise ConfigError(f"webhook URL {self.safe_url!r} does not parse") from None
        if self.url.scheme not in ("http", "https") or not self.url.host:
            raise ConfigError(f"webhook URL {self.safe_url!r} must be http:// or https://")
        #: Masks the URL's secrets in errors (and, given to the CLI's logging, in logs).
        self.redact = Redactor([*webhook_secrets(url), *webhook_secrets(str(self.url))])
        self._client = httpx.AsyncClient(timeout=timeout.total_seconds())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def __call__(self, task: Task) -> None:
        try:
            response = await self._client.post(
                self.url, json=task_document(task), headers={"Idempotency-Key": task.id}
            )
        except httpx.TimeoutException:
            raise WebhookError(f"{self.safe_url} did not answer in time") from None
        except httpx.HTTPError as e:
            # Not chained: httpx's exceptions carry the request, and with it the whole URL.
            raise WebhookError(
                self.redact(f"{self.safe_url} failed: {type(e).__name__}: {e}")
            ) from None
        if not response.is_success:
            raise WebhookError(
                self.redact(
                    f"{self.safe_url} answered {response.status_code}: {response.text[:200]!r}"
                )
            )
