"""The built-in handler that POSTs each task to a URL (``rmqdelay consume --webhook URL``)."""

from __future__ import annotations

import base64
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

import httpx

from rmqdelay.errors import ConfigError, WebhookError
from rmqdelay.task import Task


def _safe(url: httpx.URL) -> str:
    return str(url.copy_with(username=None, password=None)) if url.userinfo else str(url)


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
        self.url = httpx.URL(url)
        if self.url.scheme not in ("http", "https") or not self.url.host:
            raise ConfigError(f"webhook URL {_safe(self.url)!r} must be http:// or https://")
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
        except httpx.TimeoutException as e:
            raise WebhookError(f"{_safe(self.url)} did not answer in time") from e
        except httpx.HTTPError as e:
            raise WebhookError(f"{_safe(self.url)} failed: {type(e).__name__}: {e}") from e
        if not response.is_success:
            raise WebhookError(
                f"{_safe(self.url)} answered {response.status_code}: {response.text[:200]!r}"
            )
