"""The dashboard's pages and the actions their forms post.

Every page is rendered here, escaped by Jinja2's autoescape (keys, reasons and payloads
are user data); the one script (static/dashboard.js) only refreshes the overview and asks
before a delete. A page is reached with the session cookie the login sets, or with
``Authorization: Bearer <token>`` (scripts); an action from a browser needs the CSRF token
of its session in the form, and its Origin, when sent, must be this server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.staticfiles import StaticFiles

from rmqdelay.broker.scheduler import Scheduler
from rmqdelay.core.delays import parse_duration
from rmqdelay.core.errors import (
    ConfigError,
    InvalidDelayError,
    RmqDelayError,
    TaskNotPendingError,
)
from rmqdelay.core.recurrence import check_rule
from rmqdelay.core.redact import without_urls
from rmqdelay.settings import Settings
from rmqdelay.tools.parking import AsideQueue, ParkingLot, UnroutableQueue
from rmqdelay.web import paths  # noqa: F401  (registers the path convertors)
from rmqdelay.web.dashboard.overview import WINDOW_LABELS, OverviewSource
from rmqdelay.web.dashboard.session import COOKIE, SESSION_S, Session, Sessions
from rmqdelay.web.status import status_of

log = logging.getLogger(__name__)
audit = logging.getLogger("rmqdelay.http.access")

#: What a page shows of a payload at most (the rest is cut, saying so).
SHOWN_BYTES = 64 * 1024
#: Messages a parked or unroutable page lists.
ASIDE_PAGE = 100
TASKS_PAGE = 50
#: Outcomes an action redirects with: a fixed table, so a link cannot put words on a page.
NOTICES = {
    "cancelled": "Cancelled: the task will not run.",
    "key-cancelled": "Cancel recorded: tasks under the key published before now will not run.",
    "rescheduled": "Rescheduled.",
    "requeued": "Requeued: sent to its destination, due now.",
    "requeued-all": "Every message was requeued to its destination, due now.",
    "deleted": "Deleted.",
    "purged": "Purged.",
    "series-added": "Series added; its first occurrence is scheduled.",
    "series-removed": "Series removed; its pending occurrence is cancelled.",
}
ASIDE = {"parked": "Parked", "unroutable": "Unroutable"}
SECURITY_HEADERS = {
    # No inline script, no third-party anything: every asset is served from here.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it, Chromium sends "Origin: null" on the pages' own form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def _asset_version() -> str:
    """A hash of the assets, so a browser never mixes an old script with a new page."""
    digest = hashlib.sha256()
    for name in ("dashboard.css", "dashboard.js"):
        digest.update((resources.files("rmqdelay.web.dashboard") / "static" / name).read_bytes())
    return digest.hexdigest()[:12]


_env = Environment(
    loader=PackageLoader("rmqdelay.web.dashboard", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = (moment - datetime.now(UTC)).total_seconds()
    size = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if size >= length:
            text = f"{size / length:.0f}{unit}"
            break
    else:
        text = f"{size:.0f}s"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _ms(bound: int | None) -> str:
    if bound is None:
        return "-"
    return "> 60 s" if bound < 0 else f"≤ {bound} ms"


_env.filters.update(when=_when, relative=_relative, ms=_ms)
_env.globals.update(windows=WINDOW_LABELS)


class _LoginNeededError(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


class _ForbiddenError(Exception):
    """Refused: 403 for an action without its CSRF token (or from another origin), 401
    for a wrong bearer token."""

    def __init__(self, status: int = 403) -> None:
        self.status = status


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who asks: a browser session, or a script with the bearer token (``session`` None)."""

    session: Session | None
    new_cookie: bool = False


def _state(request: Request) -> tuple[Sessions, Scheduler, OverviewSource]:
    app = request.app
    return app.state.sessions, app.state.scheduler, app.state.overview


def _viewer(request: Request) -> Viewer:
    sessions = request.app.state.sessions
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not sessions.token_ok(given.strip()):
            raise _ForbiddenError(401)
        return Viewer(None)
    session = sessions.check(request.cookies.get(COOKIE), time.time())
    if session is not None:
        return Viewer(session)
    if not sessions.login_required:
        return Viewer(sessions.issue(time.time()), new_cookie=True)
    raise _LoginNeededError(_here(request))


def _here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _page(
    request: Request, viewer: Viewer | None, template: str, status: int = 200, **context: Any
) -> HTMLResponse:
    sessions: Sessions = request.app.state.sessions
    html = _env.get_template(template).render(
        request_path=request.url.path,
        namespace=request.app.state.settings.namespace,
        csrf=viewer.session.csrf if viewer and viewer.session else "",
        logged_in=viewer is not None and viewer.session is not None and sessions.login_required,
        asset_version=request.app.state.asset_version,
        notice=NOTICES.get(request.query_params.get("done", "")),
        error=None,
        **context,
    )
    response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
    if viewer is not None and viewer.new_cookie and viewer.session is not None:
        _set_cookie(request, response, viewer.session)
    return response


def _set_cookie(request: Request, response: Response, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        session.cookie,
        max_age=SESSION_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def _form(request: Request, viewer: Viewer) -> dict[str, str]:
    """The posted form, once its CSRF token (for a browser) and Origin check out."""
    fields = await _fields(request)
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise _ForbiddenError
    sessions: Sessions = request.app.state.sessions
    if viewer.session is not None and not sessions.csrf_ok(viewer.session, fields.get("csrf")):
        raise _ForbiddenError
    return fields


async def _fields(request: Request) -> dict[str, str]:
    """A posted form's fields (the first of each name). Forms post URL-encoded UTF-8."""
    raw = await request.body()
    if not raw:
        return {}  # a script's action that needs no field
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise _ForbiddenError
    try:
        body = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError("the form is not UTF-8 text") from None
    return {k: v[0] for k, v in parse_qs(body).items()}


def _done(request: Request, viewer: Viewer, action: str, target: str, to: str) -> Response:
    """Log the action and send the browser on (303: a reload does not post again)."""
    client = request.client.host if request.client else "-"
    by = "bearer" if viewer.session is None else f"session {viewer.session.nonce[:6]}"
    audit.info(
        "dashboard action %s %s by %s from %s",
        action,
        target,
        by,
        client,
        extra={"action": action, "target": target, "client": client},
    )
    return RedirectResponse(to, status_code=303, headers=SECURITY_HEADERS)


def _time_or_delay(text: str, what: str) -> tuple[datetime | None, timedelta | None]:
    """A time (ISO 8601; UTC without an offset) or a duration (30m, 2h), as typed."""
    text = text.strip()
    if not text:
        return None, None
    try:
        return None, parse_duration(text)
    except (InvalidDelayError, ValueError):
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidDelayError(
            f"{what} {text!r} is neither a duration (30m, 2h, 1d) nor an ISO 8601 time"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), None


def _payload(body: bytes, content_type: str | None) -> dict[str, Any]:
    """A payload as a page shows it: text (pretty JSON when it is), else base64; cut at
    ``SHOWN_BYTES``."""
    cut = len(body) > SHOWN_BYTES
    shown = body[:SHOWN_BYTES]
    try:
        text = shown.decode()
        encoding = "text"
        if not cut and (content_type or "").endswith("json"):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            encoding = "JSON"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(shown).decode(), "base64 (not UTF-8)"
    except ValueError:
        pass
    return {"text": text, "encoding": encoding, "cut": cut, "size": len(body)}


router = APIRouter(include_in_schema=False)


# -- login -------------------------------------------------------------------------------


def _next(value: str | None) -> str:
    """Where to go after the login: a path of this site only."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


@router.get("/login")
async def login_page(request: Request) -> Response:
    return _page(
        request,
        None,
        "login.html",
        title="Log in",
        next=_next(request.query_params.get("next")),
        failed=False,
    )


@router.post("/login")
async def login(request: Request) -> Response:
    sessions: Sessions = request.app.state.sessions
    fields = await _fields(request)
    target = _next(fields.get("next"))
    client = request.client.host if request.client else "-"
    if not sessions.login_required:
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    if not sessions.token_ok(fields.get("token", "")):
        audit.info("dashboard login refused from %s", client, extra={"action": "login-refused"})
        return _page(request, None, "login.html", 401, title="Log in", next=target, failed=True)
    session = sessions.issue(time.time())
    audit.info("dashboard login from %s", client, extra={"action": "login"})
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    _set_cookie(request, response, session)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    viewer = _viewer(request)
    await _form(request, viewer)
    response = _done(request, viewer, "logout", "-", "/login")
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon (browsers ask for one on every page; a 404 is an error in their console)."""
    return Response(status_code=204)


# -- overview ----------------------------------------------------------------------------


@router.get("/")
async def overview_page(request: Request) -> Response:
    viewer = _viewer(request)
    _, _, source = _state(request)
    return _page(request, viewer, "overview.html", title="Overview", o=await source.overview())


@router.get("/overview/live")
async def overview_live(request: Request) -> Response:
    """The overview's changing part alone, which the page's script fetches every 2 s."""
    viewer = _viewer(request)
    _, _, source = _state(request)
    return _page(request, viewer, "overview_live.html", o=await source.overview())


# -- pending tasks -----------------------------------------------------------------------


@router.get("/tasks")
async def tasks_page(request: Request) -> Response:
    viewer = _viewer(request)
    _, scheduler, _ = _state(request)
    q = {
        k: request.query_params.get(k, "").strip()
        for k in ("key", "id", "destination", "due_after", "due_before", "within", "cursor")
    }
    if q["id"]:
        return RedirectResponse(f"/tasks/{quote(q['id'], safe='')}", status_code=303)
    page, error, status = None, None, 200
    try:
        due_after, after_delay = _time_or_delay(q["due_after"], "due after")
        due_before, before_delay = _time_or_delay(q["due_before"], "due before")
        now = datetime.now(UTC)
        if after_delay is not None:
            due_after = now + after_delay
        if before_delay is not None:
            due_before = now + before_delay
        if q["within"]:
            due_before = now + parse_duration(q["within"])
        page = await scheduler.find(
            key=q["key"] or None,
            destination=q["destination"] or None,
            due_after=due_after,
            due_before=due_before,
            limit=TASKS_PAGE,
            cursor=q["cursor"] or None,
        )
    except RmqDelayError as e:
        error, status = without_urls(str(e), "<the broker>"), status_of(e)  # no broker URL
    except ValueError as e:
        error, status = str(e), 422
    more = None
    if page is not None and page.cursor is not None:
        more = "/tasks?" + urlencode({**{k: v for k, v in q.items() if v}, "cursor": page.cursor})
    return _page(
        request, viewer, "tasks.html", status, title="Pending tasks",
        q=q, page=page, more=more, search_error=error,
    )  # fmt: skip


@router.get("/tasks/{task_id:anything}")
async def task_page(request: Request, task_id: str) -> Response:
    viewer = _viewer(request)
    _, scheduler, _ = _state(request)
    task = await scheduler.get(task_id)
    if task is None:
        return _page(
            request,
            viewer,
            "gone.html",
            404,
            title="Not pending",
            what=f"No pending task has id {task_id!r}: it ran (or is due now), was cancelled, "
            "or never was.",
        )
    return _page(
        request,
        viewer,
        "task.html",
        title=f"Task {task_id}",
        task=task,
        payload=_payload(task.body, task.content_type),
    )


@router.post("/tasks/{task_id:anything}/cancel")
async def cancel_task(request: Request, task_id: str) -> Response:
    viewer = _viewer(request)
    await _form(request, viewer)
    _, scheduler, _ = _state(request)
    task = await scheduler.get(task_id)
    until = task.due_at + timedelta(seconds=60) if task is not None else None
    await scheduler.cancel(task_id, until=until)
    return _done(request, viewer, "cancel-task", task_id, "/tasks?done=cancelled")


@router.post("/tasks/{task_id:anything}/reschedule")
async def reschedule_task(request: Request, task_id: str) -> Response:
    viewer = _viewer(request)
    fields = await _form(request, viewer)
    _, scheduler, _ = _state(request)
    at, delay = _time_or_delay(fields.get("when", ""), "new due time")
    if at is None and delay is None:
        raise InvalidDelayError("give the new due time: a duration from now (30m) or a time")
    moved = await scheduler.reschedule(task_id, delay=delay, at=at)
    to = f"/tasks/{quote(moved.id, safe='')}?done=rescheduled"
    return _done(request, viewer, "reschedule-task", f"{task_id} to {moved.due_at.isoformat()}", to)


@router.post("/cancels")
async def cancel_key(request: Request) -> Response:
    viewer = _viewer(request)
    fields = await _form(request, viewer)
    _, scheduler, _ = _state(request)
    key = fields.get("key", "")
    at, delay = _time_or_delay(fields.get("until", ""), "until")
    await scheduler.cancel(key, until=at or delay)
    return _done(request, viewer, "cancel-key", key, "/tasks?done=key-cancelled")


# -- parked and unroutable ---------------------------------------------------------------


def _aside(request: Request, which: str) -> AsideQueue:
    _, scheduler, _ = _state(request)
    log = request.app.state.aside_logs[which]
    if which == "parked":
        return ParkingLot(scheduler, log)
    return UnroutableQueue(scheduler, log)


@router.get("/{which:aside}")
async def aside_page(request: Request, which: str) -> Response:
    viewer = _viewer(request)
    queue = _aside(request, which)
    count = await queue.count()
    messages = await queue.peek(ASIDE_PAGE)
    return _page(
        request, viewer, "aside.html", title=ASIDE[which], which=which, count=count,
        messages=messages, shown=ASIDE_PAGE,
    )  # fmt: skip


@router.get("/{which:aside}/purge")
async def purge_page(request: Request, which: str) -> Response:
    viewer = _viewer(request)
    count = await _aside(request, which).count()
    title = f"Purge {ASIDE[which].lower()}"
    return _page(request, viewer, "confirm.html", title=title, which=which, count=count)


@router.post("/{which:aside}/purge")
async def purge(request: Request, which: str) -> Response:
    viewer = _viewer(request)
    fields = await _form(request, viewer)
    if fields.get("confirm") != "purge":
        raise ConfigError("purging needs its confirmation: type purge in the box")
    gone = await _aside(request, which).purge()
    return _done(request, viewer, f"purge-{which}", f"{gone} messages", f"/{which}?done=purged")


@router.post("/{which:aside}/requeue")
async def requeue_all(request: Request, which: str) -> Response:
    viewer = _viewer(request)
    await _form(request, viewer)
    sent, _ = await _aside(request, which).requeue(None)
    to = f"/{which}?done=requeued-all"
    return _done(request, viewer, f"requeue-all-{which}", f"{sent} messages", to)


@router.get("/{which:aside}/{task_id:anything}")
async def aside_message(request: Request, which: str, task_id: str) -> Response:
    viewer = _viewer(request)
    shown = await _aside(request, which).show(task_id)
    if shown is None:
        return _page(
            request, viewer, "gone.html", 404, title="Not there",
            what=f"No message with id {task_id!r} is in the {which} queue.",
        )  # fmt: skip
    return _page(
        request, viewer, "aside_message.html", title=f"{ASIDE[which]} {task_id}", which=which,
        m=shown, payload=_payload(shown.body, shown.content_type),
    )  # fmt: skip


@router.post("/{which:aside}/{task_id:anything}/requeue")
async def requeue(request: Request, which: str, task_id: str) -> Response:
    viewer = _viewer(request)
    await _form(request, viewer)
    sent, _ = await _aside(request, which).requeue([task_id])
    if not sent:
        raise TaskNotPendingError(f"no message with id {task_id!r} is in the {which} queue")
    return _done(request, viewer, f"requeue-{which}", task_id, f"/{which}?done=requeued")


@router.post("/{which:aside}/{task_id:anything}/delete")
async def delete(request: Request, which: str, task_id: str) -> Response:
    viewer = _viewer(request)
    await _form(request, viewer)
    if not await _aside(request, which).delete(task_id):
        raise TaskNotPendingError(f"no message with id {task_id!r} is in the {which} queue")
    return _done(request, viewer, f"delete-{which}", task_id, f"/{which}?done=deleted")


# -- recurring series --------------------------------------------------------------------


@router.get("/series")
async def series_page(request: Request) -> Response:
    viewer = _viewer(request)
    _, scheduler, _ = _state(request)
    series = await scheduler.series()
    form = {k: request.query_params.get(k, "").strip() for k in ("cron", "every", "tz", "from")}
    preview, preview_error = None, None
    if form["cron"] or form["every"]:
        try:
            preview = _preview(form)
        except (RmqDelayError, ValueError) as e:
            preview_error = str(e)
    return _page(
        request,
        viewer,
        "series.html",
        title="Recurring series",
        series=series,
        form=form,
        preview=preview,
        preview_error=preview_error,
    )


def _preview(form: dict[str, str]) -> dict[str, Any]:
    """The next occurrences of a rule, each marked where the UTC offset changes."""
    now_ms = time.time_ns() // 1_000_000
    if form["from"]:
        start, _ = _time_or_delay(form["from"], "from")
        if start is not None:
            now_ms = int(start.timestamp() * 1000)
    every = parse_duration(form["every"]) if form["every"] else None
    rule = check_rule(cron=form["cron"] or None, every=every, tz=form["tz"] or None, now_ms=now_ms)
    rows, previous = [], None
    for fire in rule.upcoming(now_ms, 12):
        change = None
        if previous is not None and previous.utcoffset() != fire.utcoffset():
            change = f"UTC offset {previous.strftime('%z')} → {fire.strftime('%z')}"
        rows.append({"at": fire.isoformat(), "day": fire.strftime("%a"), "change": change})
        previous = fire
    return {"rule": rule.describe(), "rows": rows}


@router.post("/series")
async def add_series(request: Request) -> Response:
    viewer = _viewer(request)
    fields = await _form(request, viewer)
    _, scheduler, _ = _state(request)
    text = fields.get("payload", "").strip() or "null"
    try:
        payload = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"the payload is not JSON ({e})") from None
    every = parse_duration(fields["every"]) if fields.get("every", "").strip() else None
    added = await scheduler.recurring(
        fields.get("destination", ""),
        payload,
        key=fields.get("key", ""),
        cron=fields.get("cron", "").strip() or None,
        every=every,
        tz=fields.get("tz", "").strip() or None,
        catch_up=fields.get("catch_up", "once"),
    )
    return _done(
        request, viewer, "add-series", f"{added.key}: {added.rule}", "/series?done=series-added"
    )


@router.post("/series/{key:anything}/remove")
async def remove_series(request: Request, key: str) -> Response:
    viewer = _viewer(request)
    await _form(request, viewer)
    _, scheduler, _ = _state(request)
    if key not in {s.key for s in await scheduler.series()}:
        raise ConfigError(f"no series under key {key!r}; nothing was changed")
    await scheduler.remove_series(key)
    return _done(request, viewer, "remove-series", key, "/series?done=series-removed")


# -- errors ------------------------------------------------------------------------------


def dashboard_path(path: str) -> bool:
    """Whether ``path`` is the dashboard's (its errors are pages, not JSON)."""
    return not path.startswith(("/v1/", "/healthz", "/openapi.json", "/static/"))


def on_login_needed(request: Request, error: Exception) -> Response:
    assert isinstance(error, _LoginNeededError)
    return RedirectResponse("/login?" + urlencode({"next": error.path}), status_code=303)


def on_forbidden(request: Request, error: Exception) -> Response:
    assert isinstance(error, _ForbiddenError)
    if error.status == 401:
        message = "The bearer token is not this server's (RMQDELAY_HTTP_TOKEN)."
        response = _page(request, None, "gone.html", 401, title="Refused", what=message)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    message = (
        "This action was refused: the form did not come from this dashboard, or its page is "
        "too old (its CSRF token is missing or wrong). Reload the page and try again."
    )
    return _page(request, None, "gone.html", 403, title="Refused", what=message)


def on_refused(request: Request, message: str, status: int) -> Response:
    """A library error on a dashboard page: its message, on a page."""
    return _page(request, None, "gone.html", status, title="Refused", what=message)


def install(app: FastAPI, settings: Settings) -> None:
    """Add the dashboard to the API's app: its pages, its assets at /static, and its
    error pages (``app.state.scheduler`` must be set by the lifespan, and
    ``app.state.overview`` too)."""
    token = settings.http_token.get_secret_value() if settings.http_token else None
    app.state.sessions = Sessions(token)
    app.state.settings = settings
    app.state.asset_version = _asset_version()
    app.include_router(router)
    app.mount(
        "/static", StaticFiles(packages=[("rmqdelay.web.dashboard", "static")]), name="static"
    )
    app.add_exception_handler(_LoginNeededError, on_login_needed)
    app.add_exception_handler(_ForbiddenError, on_forbidden)
