"""The dashboard ``rmqdelay serve`` serves at ``/``: in headless Chromium (Debian's
``chromium``, driven by Playwright) for what a person does, and over plain HTTP for the
headers, cookies and refusals a browser does not show.

Screenshots go to tests/output/screenshots (kept by CI as test output).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from rmqdelay import RetryPolicy, Scheduler, Settings, Task, TaskSpec
from rmqdelay.core.topology import build_topology

from .conftest import ROOT, apply, cannot, make_settings
from .helpers import Recorder, Server, running_worker

pytestmark = pytest.mark.integration

TOKEN = "dashboard-token-not-in-any-url"
SHOTS = ROOT / "tests" / "output" / "screenshots"
DEST = "escalations"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def board_settings(broker_url: str) -> Iterator[Settings]:
    """A namespace of its own: its parking lot and series are this module's alone."""
    settings = make_settings(broker_url).model_copy(update={"http_token": SecretStr(TOKEN)})
    topology = build_topology(settings.layout, (DEST,))
    asyncio.run(apply(settings, topology))
    yield settings
    asyncio.run(apply(settings, topology, delete=True))


@pytest.fixture(scope="module")
def base_url(board_settings: Settings) -> Iterator[str]:
    with Server(board_settings) as url:
        yield url


def _chromium() -> str:
    path = os.environ.get("RMQDELAY_TEST_CHROMIUM") or shutil.which("chromium")
    if path is None:
        cannot("no chromium on PATH: apt-get install chromium (scripts/test does, as root)")
    assert path is not None
    return path


@pytest.fixture
async def page(base_url: str) -> AsyncIterator[Any]:
    """A fresh browser page (no cookies), whose dialogs are recorded and accepted, and
    whose console errors and failed requests fail the test."""
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        context = await browser.new_context(
            base_url=base_url, viewport={"width": 1360, "height": 900}
        )
        page = await context.new_page()
        page.set_default_timeout(15_000)
        page.dialogs = []  # type: ignore[attr-defined]
        page.problems = []  # type: ignore[attr-defined]

        async def on_dialog(dialog: Any) -> None:
            page.dialogs.append((dialog.type, dialog.message))  # type: ignore[attr-defined]
            await dialog.accept()

        page.on("dialog", on_dialog)
        page.on(
            "console",
            lambda m: m.type == "error" and page.problems.append(m.text),  # type: ignore[attr-defined]
        )
        try:
            yield page
        finally:
            await browser.close()


async def _login(page: Any, path: str = "/") -> None:
    await page.goto(path)
    assert "/login" in page.url, "a page without a session must lead to the login"
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(re.escape(path) + "$"))


async def _shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


@pytest.mark.browser
async def test_login_then_a_scheduled_task_appears_live_and_is_cancelled(
    page: Any, board_settings: Settings
) -> None:
    from playwright.async_api import expect

    await _login(page)
    assert TOKEN not in page.url
    cookies = await page.context.cookies()
    [session] = [c for c in cookies if c["name"] == "rmqdelay_session"]
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert TOKEN not in session["value"]

    key = f"incident:{uuid.uuid4().hex[:8]}"
    async with (
        Scheduler(board_settings) as scheduler,
        running_worker(board_settings, DEST, Recorder()) as worker,
    ):
        task = await scheduler.schedule(DEST, {"incident": 42}, delay=1800, keys=[key])
        await scheduler.schedule_many(
            [TaskSpec(DEST, {"n": n}, delay=0.2 + n / 20) for n in range(20)]
        )
        # The overview refreshes itself: the task shows up without a reload, and then what
        # the worker reported (its records come every 5 s).
        row = page.locator("table.overview tbody tr", has_text=DEST)
        await expect(row).to_be_visible(timeout=20_000)
        cells = row.locator("td")
        await expect(cells.nth(2)).to_have_text("1", timeout=20_000)  # due in 1 min-1 h
        await expect(cells.nth(8)).to_have_text("1", timeout=20_000)  # one worker
        async with asyncio.timeout(20):
            await worker.wait_for(lambda s: s.executed >= 20)
        await expect(cells.nth(9)).to_have_text("20", timeout=20_000)  # executed
        await expect(cells.nth(12)).to_contain_text("ms")  # lateness p50
        await _shot(page, "overview")

        await page.goto(f"/tasks?key={key}")
        await page.click(f"text={task.id}")
        await expect(page.locator("pre.payload")).to_contain_text('"incident": 42')
        await _shot(page, "task")
        await page.click("button:has-text('Cancel task')")
        await page.wait_for_url(re.compile(r"/tasks\?done=cancelled$"))
        await expect(page.locator(".notice")).to_contain_text("Cancelled")
        assert page.dialogs == [("confirm", "Cancel this task?")]  # type: ignore[attr-defined]
        assert await scheduler.get(task.id) is None
    assert page.problems == []  # type: ignore[attr-defined]


@pytest.mark.browser
async def test_a_parked_task_is_shown_and_requeued(page: Any, board_settings: Settings) -> None:
    from playwright.async_api import expect

    async def broken(task: Task) -> None:
        raise LookupError(f"no account {XSS} for {task.payload['n']}")

    once = RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1)
    async with (
        running_worker(board_settings, DEST, broken, retry=once) as worker,
        Scheduler(board_settings) as scheduler,
    ):
        parked = await scheduler.schedule(DEST, {"n": 7}, delay=0)
        async with asyncio.timeout(15):
            await worker.wait_for(lambda s: s.parked >= 1)
        await _login(page, "/parked")
        row = page.locator("table.aside tbody tr", has_text=parked.id)
        await expect(row).to_contain_text("LookupError")
        await expect(row).to_contain_text(XSS)  # the error is user data: shown as text
        await _shot(page, "parked")
        # Shown from the parking lot's log, not by taking the lot.
        await row.locator(f"a:has-text('{parked.id}')").click()
        await expect(page.locator("pre.payload")).to_contain_text('"n": 7')
        await expect(page.locator("main")).to_contain_text("logged as it arrived")
        await _shot(page, "parked-message")
        await page.go_back()
        await row.locator("button:has-text('Requeue')").click()
        await page.wait_for_url(re.compile(r"/parked\?done=requeued$"))
        await expect(page.locator(".notice")).to_contain_text("Requeued")
        # Back in its work queue, due now: the (still broken) worker takes it again, and
        # parks it again.
        async with asyncio.timeout(15):
            await worker.wait_for(lambda s: s.parked >= 2)
    assert page.problems == []  # type: ignore[attr-defined]


@pytest.mark.browser
async def test_a_series_is_previewed_added_and_removed(page: Any, board_settings: Settings) -> None:
    from playwright.async_api import expect

    await _login(page, "/series")
    # Preview across the spring change in Berlin: the offset change is marked.
    await page.fill("form.search input[name=cron]", "0 8 * * *")
    await page.fill("form.search input[name=tz]", "Europe/Berlin")
    await page.fill("form.search input[name=from]", "2027-03-26T00:00:00Z")
    await page.click("form.search button")
    changed = page.locator("table.preview tr.offset-change")
    await expect(changed).to_have_count(1)
    await expect(changed).to_contain_text("2027-03-28T08:00:00+02:00")
    await expect(changed).to_contain_text("+0100 → +0200")
    await _shot(page, "series-preview")

    key = f"report:{uuid.uuid4().hex[:6]}"
    form = page.locator("form.stacked")
    await form.locator("input[name=key]").fill(key)
    await form.locator("input[name=destination]").fill(DEST)
    await form.locator("input[name=every]").fill("1h")
    await form.locator("textarea[name=payload]").fill('{"report": "daily"}')
    await form.locator("button").click()
    await page.wait_for_url(re.compile(r"/series\?done=series-added$"))
    row = page.locator("table.series tbody tr", has_text=key)
    await expect(row).to_contain_text("every 1h")
    async with Scheduler(board_settings) as scheduler:
        assert key in {s.key for s in await scheduler.series()}
        await row.locator("button:has-text('Remove')").click()
        await page.wait_for_url(re.compile(r"/series\?done=series-removed$"))
        await expect(page.locator("table.series")).not_to_contain_text(key)
        assert key not in {s.key for s in await scheduler.series()}


@pytest.mark.browser
async def test_keys_and_payloads_render_as_text_and_no_script_runs(
    page: Any, board_settings: Settings
) -> None:
    from playwright.async_api import expect

    async with Scheduler(board_settings) as scheduler:
        task = await scheduler.schedule(
            DEST, {"note": "</pre><script>alert(2)</script>"}, delay=3600, keys=[XSS]
        )
        await _login(page, "/tasks")
        await page.fill("input[name=key]", XSS)
        await page.click("form.search button")
        row = page.locator("table.tasks tbody tr", has_text=task.id)
        await expect(row.locator(".key")).to_have_text(XSS)
        await row.locator(f"text={task.id}").click()
        await expect(page.locator("pre.payload")).to_contain_text("<script>alert(2)</script>")
        await expect(page.locator(".key")).to_have_text(XSS)
        await _shot(page, "escaping")
        assert await page.locator("main img").count() == 0
        assert await page.locator("main script").count() == 0
        assert page.dialogs == []  # type: ignore[attr-defined]
        await scheduler.cancel(task.id)


@pytest.mark.browser
async def test_an_action_without_its_csrf_token_is_refused(
    page: Any, board_settings: Settings
) -> None:
    from playwright.async_api import expect

    async with Scheduler(board_settings) as scheduler:
        task = await scheduler.schedule(DEST, {"n": 1}, delay=3600)
        await _login(page, f"/tasks/{task.id}")
        # As a form another site made would be: the session cookie, but not the token.
        await page.evaluate(
            "document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())"
        )
        await page.click("button:has-text('Cancel task')")
        await expect(page.locator("h1")).to_have_text("Refused")
        await expect(page.locator(".error")).to_contain_text("CSRF")
        assert await scheduler.get(task.id) is not None, "the refused action happened anyway"
        await scheduler.cancel(task.id)


# --- over plain HTTP ----------------------------------------------------------------------


async def test_pages_send_a_policy_that_forbids_inline_script_and_framing(base_url: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        for path in ("/", "/tasks", "/parked", "/unroutable", "/series", "/overview/live"):
            response = await client.get(path)
            assert response.status_code == 200, path
            policy = response.headers["content-security-policy"]
            assert "script-src 'self'" in policy
            assert "unsafe-inline" not in policy
            assert "frame-ancestors 'none'" in policy
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "<script>" not in response.text  # only <script src=...>
        assets = [await client.get(f"/static/dashboard.{ext}", headers={}) for ext in ("css", "js")]
        assert all(a.status_code == 200 for a in assets)
        assert sum(len(a.content) for a in assets) < 300 * 1024


async def test_who_may_see_and_act(base_url: str, board_settings: Settings) -> None:
    """No session: to the login. A wrong bearer: 401. A session's action without its
    CSRF token, or from another origin: 403. The bearer alone may act (scripts). Each
    action is in the access log; the token never is."""
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    access = logging.getLogger("rmqdelay.http.access")
    catch, level = Catch(), access.level
    access.addHandler(catch)
    access.setLevel(logging.INFO)
    try:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=30) as browser,
            Scheduler(board_settings) as scheduler,
        ):
            assert (await browser.get("/tasks")).status_code == 303
            assert (await browser.get("/tasks")).headers["location"] == "/login?next=%2Ftasks"
            wrong = {"Authorization": "Bearer not-the-token"}
            assert (await browser.get("/", headers=wrong)).status_code == 401
            refused = await browser.post("/login", data={"token": "not-the-token"})
            assert refused.status_code == 401

            login = await browser.post("/login", data={"token": TOKEN, "next": "//evil.example"})
            assert login.status_code == 303
            assert login.headers["location"] == "/"
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=strict" in cookie.replace("Strict", "strict")
            page = (await browser.get("/tasks")).text
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
            assert csrf is not None

            task = await scheduler.schedule(DEST, {"n": 2}, delay=3600)
            cancel = f"/tasks/{task.id}/cancel"
            assert (await browser.post(cancel, data={})).status_code == 403
            assert (await browser.post(cancel, data={"csrf": "0" * 32})).status_code == 403
            foreign = {"Origin": "https://evil.example"}
            assert (
                await browser.post(cancel, data={"csrf": csrf[1]}, headers=foreign)
            ).status_code == 403
            assert await scheduler.get(task.id) is not None
            done = await browser.post(cancel, data={"csrf": csrf[1]})
            assert done.status_code == 303
            assert await scheduler.get(task.id) is None

            other = await scheduler.schedule(DEST, {"n": 3}, delay=3600)
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=base_url, headers=bearer, timeout=30) as script:
                moved = await script.post(f"/tasks/{other.id}/reschedule", data={"when": "2h"})
                assert moved.status_code == 303
                later = await scheduler.get(other.id)
                assert later is not None
                assert later.due_at > other.due_at + timedelta(minutes=59)
                bad = await script.post(f"/tasks/{other.id}/reschedule", data={"when": "soon"})
                assert bad.status_code == 422
                assert "neither a duration" in bad.text
                assert (await script.post(f"/tasks/{other.id}/cancel", data={})).status_code == 303
            assert await scheduler.get(other.id) is None
    finally:
        access.removeHandler(catch)
        access.setLevel(level)
    actions = [line for line in lines if "dashboard action cancel-task" in line]
    assert any(task.id in line and "by session" in line for line in actions)
    assert any(other.id in line and "by bearer" in line for line in actions)
    assert any("dashboard login refused" in line for line in lines)
    assert not any(TOKEN in line for line in lines)
