"""``rmqdelay serve``: schedule, cancel, look up and reschedule over HTTP, for services that
do not speak AMQP.

FastAPI on uvicorn, one Scheduler (one connection) per process. Every call is checked by
the library's own validation and answered with its message; a 201 means the broker has
confirmed the task, exactly as ``schedule()`` returning does.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, JsonValue
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rmqdelay.broker.health import Reachability
from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.delays import parse_duration
from rmqdelay.core.errors import (
    ConfigError,
    InvalidDelayError,
    InvalidQueryError,
    RmqDelayError,
)
from rmqdelay.core.journal import MAX_PAGE
from rmqdelay.core.redact import without_urls
from rmqdelay.settings import Settings
from rmqdelay.tools.aside_log import AsideLog
from rmqdelay.tools.task_json import pending_json, shown
from rmqdelay.web import paths  # noqa: F401  (registers the path convertors)
from rmqdelay.web.dashboard import pages as dashboard
from rmqdelay.web.dashboard.overview import OverviewSource
from rmqdelay.web.status import status_of

log = logging.getLogger(__name__)
access_log = logging.getLogger("rmqdelay.http.access")

#: Room for the JSON around a payload of the largest size the settings allow.
ENVELOPE_BYTES = 64 * 1024


class TaskRequest(BaseModel):
    """``POST /v1/tasks``: give exactly one of ``delay``, ``delay_ms`` and ``at``.

    The limits are in the OpenAPI document for clients to read, but checked by the
    library, so that a refusal carries its message, naming the bad value.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [{"required": ["delay"]}, {"required": ["delay_ms"]}, {"required": ["at"]}]
        },
    )

    destination: str = Field(
        description="Work queue to deliver to; it must exist.",
        json_schema_extra={"pattern": r"^[A-Za-z0-9_.:-]+$", "minLength": 1, "maxLength": 200},
    )
    payload: JsonValue = Field(description="Any JSON value; the handler receives it decoded.")
    delay: str | None = Field(
        default=None,
        description="A duration: 250ms, 90s, 30m, 2h, 3d, 1h30m.",
        examples=["30m"],
        json_schema_extra={"pattern": r"^([0-9]+(\.[0-9]+)?(us|ms|s|m|h|d|w))+$"},
    )
    delay_ms: int | None = Field(
        default=None, description="The delay in milliseconds.", json_schema_extra={"minimum": 0}
    )
    at: str | None = Field(
        default=None,
        description="Due time, RFC 3339 with a UTC offset.",
        examples=["2026-12-01T08:00:00+01:00"],
        json_schema_extra={"format": "date-time"},
    )
    id: str | None = Field(
        default=None,
        description="Your own task id (default: a new one); 1-255 bytes of UTF-8.",
        json_schema_extra={"minLength": 1, "maxLength": 255},
    )
    keys: list[str] = Field(
        default_factory=list,
        description="Cancel keys, each 1-255 bytes of UTF-8.",
        json_schema_extra={"maxItems": 32},
    )
    replace: bool = Field(
        default=False, description="Cancel the tasks under `keys` first (reschedule)."
    )


class TaskCreated(BaseModel):
    """A task the broker has confirmed."""

    id: str
    destination: str
    due_at: datetime
    hops: int
    keys: list[str]


class Cancelled(BaseModel):
    """A cancel the broker has confirmed: tasks under ``key`` published up to ``at`` do
    not run."""

    key: str
    at: datetime
    pending: int | None = Field(
        default=None, description="Pending tasks under the key just before (with count=true)."
    )


class PendingSummary(BaseModel):
    """A pending task, as listed."""

    id: str
    destination: str
    due_at: datetime
    attempt: int
    keys: list[str]
    size: int = Field(description="Payload size in bytes.")
    series: str | None = Field(default=None, description="Its recurring series' key, if any.")


class PendingDetail(PendingSummary):
    """A pending task, whole: ``payload`` when it is JSON, else ``payload_base64``."""

    published_at: datetime
    content_type: str | None
    properties: dict[str, JsonValue]
    headers: dict[str, JsonValue]
    payload: JsonValue = None
    payload_base64: str | None = None


class TaskListing(BaseModel):
    """One page of pending tasks, soonest due first; pass ``cursor`` for the next."""

    tasks: list[PendingSummary]
    cursor: str | None


class RescheduleRequest(BaseModel):
    """``PATCH /v1/tasks/{id}``: the new due time; give exactly one field."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [{"required": ["delay"]}, {"required": ["delay_ms"]}, {"required": ["at"]}]
        },
    )

    delay: str | None = Field(default=None, description="From now: 90s, 30m, 2h.")
    delay_ms: int | None = Field(default=None, description="From now, in milliseconds.")
    at: str | None = Field(
        default=None,
        description="RFC 3339 with a UTC offset.",
        json_schema_extra={"format": "date-time"},
    )


class Problem(BaseModel):
    """Every error: the error's type and a message naming what to change."""

    error: str
    message: str


class Health(BaseModel):
    """Whether this process can reach the broker."""

    status: str


_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No or a wrong bearer token."},
    413: {"model": Problem, "description": "The request is larger than allowed."},
    422: {"model": Problem, "description": "Refused; the message names the bad value."},
    503: {"model": Problem, "description": "The broker did not confirm in time."},
}


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No work queue for the destination."}
}


def _problem(status: int, error: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status, headers=headers or None)


def _delay(request: TaskRequest | RescheduleRequest) -> tuple[timedelta | None, datetime | None]:
    given = [name for name in ("delay", "delay_ms", "at") if getattr(request, name) is not None]
    if len(given) != 1:
        raise InvalidDelayError(
            f"give exactly one of delay, delay_ms and at (got {', '.join(given) or 'none'})"
        )
    if request.delay is not None:
        return parse_duration(request.delay), None
    if request.delay_ms is not None:
        if request.delay_ms < 0:
            raise InvalidDelayError(f"delay_ms must not be negative, got {request.delay_ms}")
        try:
            return timedelta(milliseconds=request.delay_ms), None
        except OverflowError:
            raise InvalidDelayError(
                f"delay_ms={request.delay_ms} is beyond any delay rmqdelay can hold"
            ) from None
    assert request.at is not None
    try:
        return None, datetime.fromisoformat(request.at)
    except ValueError:
        raise InvalidDelayError(
            f"at={request.at[:60]!r} is not an RFC 3339 time such as 2026-12-01T08:00:00+01:00"
        ) from None


class BodyLimit:
    """Refuse (413) a request body over ``limit`` bytes, whether or not it says its length,
    before the framework reads it into memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _problem(413, "RequestTooLarge", f"the request body is over {self.limit} bytes")
        await response(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="RMQDELAY_HTTP_TOKEN")


async def _authorized(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    token: str | None = request.app.state.token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    # Constant time: the comparison must not tell an attacker how much of a guess is right.
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise _UnauthorizedError


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


router = APIRouter()


@router.post(
    "/v1/tasks",
    status_code=201,
    response_model=TaskCreated,
    responses=_PROBLEMS | _NOT_FOUND,
    dependencies=[Depends(_authorized)],
    summary="Schedule a task",
)
async def _schedule(
    request: TaskRequest, scheduler: Annotated[Scheduler, Depends(_scheduler)]
) -> TaskCreated:
    delay, at = _delay(request)
    scheduled = await scheduler.schedule(
        request.destination,
        request.payload,
        delay=delay,
        at=at,
        task_id=request.id,
        keys=request.keys,
        replace=request.replace,
    )
    return TaskCreated(
        id=scheduled.id,
        destination=scheduled.destination,
        due_at=scheduled.due_at,
        hops=scheduled.hops,
        keys=list(scheduled.keys),
    )


@router.delete(
    "/v1/keys/{key:anything}",
    response_model=Cancelled,
    responses=_PROBLEMS
    | {404: {"model": Problem, "description": "No key in the path (an empty key)."}},
    dependencies=[Depends(_authorized)],
    summary="Cancel every pending task under a key (or with that id)",
)
async def _cancel(
    key: Annotated[str, Path(description="The cancel key or task id (URL-encoded).")],
    scheduler: Annotated[Scheduler, Depends(_scheduler)],
    until: Annotated[
        str | None, Query(description="Forget the cancel after this duration (e.g. 2h).")
    ] = None,
    count: Annotated[
        bool, Query(description="Count the pending tasks under the key first (reads the journal).")
    ] = False,
) -> Cancelled:
    cancellation = await scheduler.cancel(
        key, until=parse_duration(until) if until is not None else None, count=count
    )
    return Cancelled(key=cancellation.key, at=cancellation.at, pending=cancellation.pending)


_LOOKUP: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such pending task."},
    409: {"model": Problem, "description": "No journal to look in (RMQDELAY_JOURNAL)."},
}


def _time(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidQueryError(
            f"{name}={text[:60]!r} is not an RFC 3339 time such as 2026-12-01T08:00:00+01:00"
        ) from None


@router.get(
    "/v1/tasks",
    response_model=TaskListing,
    responses=_PROBLEMS | _LOOKUP,
    dependencies=[Depends(_authorized)],
    summary="List pending tasks, soonest due first, a page at a time",
)
async def _list(
    scheduler: Annotated[Scheduler, Depends(_scheduler)],
    key: Annotated[str | None, Query(description="Only tasks under this key (or id).")] = None,
    destination: Annotated[str | None, Query(description="Only this destination.")] = None,
    due_before: Annotated[str | None, Query(description="RFC 3339: due before it.")] = None,
    due_after: Annotated[str | None, Query(description="RFC 3339: due at or after it.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Tasks per page.")] = 100,
    cursor: Annotated[str | None, Query(description="The last page's cursor.")] = None,
) -> Any:
    page = await scheduler.find(
        key=key,
        destination=destination,
        due_before=_time(due_before, "due_before"),
        due_after=_time(due_after, "due_after"),
        limit=limit,
        cursor=cursor,
    )
    return {"tasks": [pending_json(t, whole=False) for t in page.tasks], "cursor": page.cursor}


@router.get(
    "/v1/tasks/{task_id:anything}",
    response_model=PendingDetail,
    responses=_PROBLEMS | _LOOKUP,
    dependencies=[Depends(_authorized)],
    summary="One pending task, with its payload and properties",
)
async def _show(
    task_id: Annotated[str, Path(description="The task id (URL-encoded).")],
    scheduler: Annotated[Scheduler, Depends(_scheduler)],
) -> Any:
    return await shown(scheduler, task_id)


@router.patch(
    "/v1/tasks/{key:anything}",
    response_model=TaskCreated,
    responses=_PROBLEMS
    | {
        404: {"model": Problem, "description": "No pending task with this id or key."},
        409: {"model": Problem, "description": "Due too soon to move; it runs as it was."},
    },
    dependencies=[Depends(_authorized)],
    summary="Reschedule a pending task (by id, or the one under a key)",
)
async def _reschedule(
    key: Annotated[str, Path(description="The task id, or a key with one pending task.")],
    request: RescheduleRequest,
    scheduler: Annotated[Scheduler, Depends(_scheduler)],
) -> TaskCreated:
    delay, at = _delay(request)
    moved = await scheduler.reschedule(key, delay=delay, at=at)
    return TaskCreated(
        id=moved.id,
        destination=moved.destination,
        due_at=moved.due_at,
        hops=moved.hops,
        keys=list(moved.keys),
    )


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Problem, "description": "The broker is out of reach."}},
    summary="Readiness: the broker answers this process within 2 s",
)
async def _healthz(request: Request) -> Any:
    reachability: Reachability = request.app.state.reachability
    if (problem := await reachability.problem()) is not None:
        return _problem(503, "BrokerUnavailable", problem)
    return Health(status="ok")


async def _on_unauthorized(_: Request, __: Exception) -> JSONResponse:
    return _problem(
        401,
        "Unauthorized",
        "send 'Authorization: Bearer <RMQDELAY_HTTP_TOKEN>'",
        **{"WWW-Authenticate": "Bearer"},
    )


async def _on_refused(request: Request, error: Exception) -> Response:
    assert isinstance(error, RmqDelayError)
    status = status_of(error)
    message = str(error)
    if status >= 500:
        # Where the broker is (user, host, port, vhost) is for the server's log, not for
        # whoever calls the API.
        log.error("%s: %s", type(error).__name__, message)
        message = without_urls(message, "<the broker>")
    if dashboard.dashboard_path(request.url.path):
        return dashboard.on_refused(request, message, status)
    return _problem(status, type(error).__name__, message)


async def _on_http(_: Request, error: Exception) -> JSONResponse:
    """Routing's own answers (no such path, wrong method) in the shape of every other."""
    assert isinstance(error, StarletteHTTPException)
    return _problem(error.status_code, "HTTPError", str(error.detail))


async def _on_invalid(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return _problem(422, "InvalidRequest", _describe(error))


def create_app(settings: Settings) -> FastAPI:
    """The API, with one Scheduler that the app's lifespan starts and closes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler = Scheduler(settings)
        await scheduler.start()
        if scheduler.wiring.layout.journal:
            # Lookups from memory, not a read of the whole journal per request.
            await scheduler.follow_journal()
        app.state.scheduler = scheduler
        app.state.reachability = reachability = Reachability(scheduler)
        app.state.overview = overview = OverviewSource(settings, scheduler)
        if scheduler.wiring.layout.journal:
            overview.start()
        names = scheduler.wiring.names
        app.state.aside_logs = logs = {
            which: AsideLog(names.aside_log(queue))
            for which, queue in (("parked", names.parked), ("unroutable", names.unroutable))
        }
        # Read the logs once now, so that the first look at a message need not.
        priming = [asyncio.create_task(log.catch_up(scheduler.connection)) for log in logs.values()]
        try:
            yield
        finally:
            for task in priming:
                task.cancel()
            await asyncio.gather(*priming, return_exceptions=True)
            await overview.close()
            await reachability.close()
            await scheduler.close()

    app = FastAPI(
        title="rmqdelay",
        summary="Delayed and scheduled tasks on RabbitMQ.",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.token = settings.http_token.get_secret_value() if settings.http_token else None
    app.include_router(router)
    dashboard.install(app, settings)
    app.add_exception_handler(_UnauthorizedError, _on_unauthorized)
    app.add_exception_handler(RmqDelayError, _on_refused)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    # Added last, so outermost: the access log sees the 413s too.
    app.add_middleware(BodyLimit, limit=settings.max_message_size + ENVELOPE_BYTES)
    app.add_middleware(AccessLog)
    return app


class _UnauthorizedError(Exception):
    pass


def _describe(error: RequestValidationError) -> str:
    """Pydantic's complaints, one clause each, without echoing the input (it may be big,
    or a secret pasted into the wrong field)."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts[:10]) or "the request is not valid"


class AccessLog:
    """One line per request (method, path, status, duration, client, request id); never
    headers, query or body, where tokens and payloads live."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            if _utf8_path(scope):
                await self.app(scope, receive, sending)
            else:
                await _problem(
                    400, "InvalidRequest", "the path is not UTF-8 text once percent-decoded"
                )(scope, receive, sending)
        finally:
            client = scope.get("client")
            duration_ms = round((time.perf_counter() - started) * 1000, 2)
            access_log.info(
                "%s %s %d %.2f ms client %s request %s",
                scope["method"],
                scope["path"],  # user data: the log formatter escapes control characters
                status,
                duration_ms,
                client[0] if client else "-",
                request_id,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": duration_ms,
                    "client": client[0] if client else None,
                    "request_id": request_id,
                },
            )


def _utf8_path(scope: Scope) -> bool:
    """Whether the request's path is UTF-8 once percent-decoded: the framework would read
    '%ff' as U+FFFD, and a key that is not the one sent would be cancelled."""
    raw = scope.get("raw_path")
    try:
        unquote_to_bytes(raw if isinstance(raw, bytes) else b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token.

    Raises:
        ConfigError: ``host`` is not a loopback address and no token is set.
    """
    if token:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"refusing to serve on {host!r} without RMQDELAY_HTTP_TOKEN: anyone who can "
            "reach it could schedule and cancel; set a token, or listen on 127.0.0.1"
        )


def server_config(settings: Settings, host: str, port: int) -> Any:
    """uvicorn's configuration for the API: our access log and logging, not uvicorn's."""
    import uvicorn

    # uvicorn's access log carries the query string and the client's port; ours does not.
    logging.getLogger("uvicorn.access").disabled = True
    return uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        access_log=False,
        log_config=None,  # the CLI's logging, with its secret masking
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace.total_seconds())),
    )


async def serve(settings: Settings, host: str, port: int) -> None:
    """Serve the API until interrupted (uvicorn handles SIGINT and SIGTERM).

    Raises:
        ConfigError: a non-loopback ``host`` without RMQDELAY_HTTP_TOKEN.
    """
    import uvicorn

    token = settings.http_token.get_secret_value() if settings.http_token else None
    check_bind(host, token)
    await uvicorn.Server(server_config(settings, host, port)).serve()
