"""Pending tasks as JSON: what ``rmqdelay tasks --json`` prints and the HTTP API answers."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.errors import TaskNotPendingError
from rmqdelay.core.task import PendingTask


def pending_json(task: PendingTask, *, whole: bool) -> dict[str, Any]:
    """A pending task as JSON: the summary, and with ``whole`` the payload and properties."""
    out: dict[str, Any] = {
        "id": task.id,
        "destination": task.destination,
        "due_at": task.due_at.isoformat(),
        "attempt": task.attempt,
        "keys": list(task.keys),
        "size": task.size,
    }
    if task.series is not None:
        out["series"] = task.series
    if whole:
        out["published_at"] = task.published_at.isoformat()
        out["content_type"] = task.content_type
        out["properties"] = {k: _jsonable(v) for k, v in task.properties.items()}
        out["headers"] = {k: _jsonable(v) for k, v in task.headers.items()}
        out.update(payload_json(task))
    return out


def payload_json(task: PendingTask) -> dict[str, Any]:
    """The payload as JSON when it is JSON, else the body in base64."""
    if task.content_type == "application/json":
        try:
            return {"payload": json.loads(task.body)}
        except ValueError:
            pass
    return {"payload_base64": base64.b64encode(task.body).decode()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


async def shown(scheduler: Scheduler, task_id: str) -> dict[str, Any]:
    """``show``'s JSON of a pending task, or TaskNotPendingError saying why there is none."""
    task = await scheduler.get(task_id)
    if task is None:
        raise TaskNotPendingError(
            f"no pending task has id {task_id!r}: it ran (or is due now), was cancelled, or "
            "was never scheduled in this namespace"
        )
    return pending_json(task, whole=True)
