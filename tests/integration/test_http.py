"""``rmqdelay serve``: the HTTP API over real HTTP, against the real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from pydantic import SecretStr
from schemathesis.checks import positive_data_acceptance

from rmqdelay import ConfigError, Scheduler, Settings, SyncScheduler
from rmqdelay.cli.main import main
from rmqdelay.core.redact import Redactor
from rmqdelay.tools.logs import TextFormatter
from rmqdelay.web.api import check_bind

from .helpers import Recorder, Server, depth, running_worker, use_in_cli
from .proxy import Proxy

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-the-api"


@pytest.fixture(scope="module")
def api_settings(settings: Settings) -> Settings:
    # A small size limit, so that the 413 path is cheap to reach.
    return settings.model_copy(update={"http_token": SecretStr(TOKEN), "max_message_size": 4096})


@pytest.fixture(scope="module")
def base_url(api_settings: Settings) -> Iterator[str]:
    with Server(api_settings) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        yield client


async def test_post_schedules_a_task_that_a_worker_runs(
    api_settings: Settings, destination: str, client: httpx.AsyncClient
) -> None:
    recorder = Recorder()
    async with Scheduler(api_settings) as scheduler:
        await scheduler.declare_destination(destination)
    replies = [
        await client.post(
            "/v1/tasks", json={"destination": destination, "payload": {"n": 1}, "delay": "300ms"}
        ),
        await client.post(
            "/v1/tasks", json={"destination": destination, "payload": [2], "delay_ms": 200}
        ),
        await client.post(
            "/v1/tasks",
            json={
                "destination": destination,
                "payload": "three",
                "at": (datetime.now().astimezone() + timedelta(seconds=0.4)).isoformat(),
                "id": "my-own-id",
                "keys": ["k:3"],
            },
        ),
    ]
    assert [r.status_code for r in replies] == [201, 201, 201], [r.text for r in replies]
    created = [r.json() for r in replies]
    assert created[2]["id"] == "my-own-id"
    assert created[2]["keys"] == ["k:3"]
    assert datetime.fromisoformat(created[0]["due_at"]).tzinfo is not None
    async with running_worker(api_settings, destination, recorder):
        await recorder.wait_for({c["id"] for c in created}, within=30)
    payloads = sorted(repr(task.payload) for task, _ in recorder.runs)
    assert payloads == sorted(["{'n': 1}", "[2]", "'three'"])
    assert min(recorder.lateness_ms().values()) >= 0


async def test_pending_tasks_are_listed_shown_rescheduled_and_counted_over_http(
    api_settings: Settings, destination: str, client: httpx.AsyncClient
) -> None:
    key = f"incident/{destination} é"  # a slash and non-ASCII in the path
    path_key = httpx.URL(path=key).raw_path.decode()
    async with Scheduler(api_settings) as scheduler:
        await scheduler.declare_destination(destination)
    made = await client.post(
        "/v1/tasks",
        # Hours ahead: the work queue goes with the test, and a task of this shared
        # namespace reaching the unroutable queue while other tests run would confuse them.
        json={"destination": destination, "payload": {"n": 1}, "delay": "3h", "keys": [key]},
    )
    task_id = made.json()["id"]
    listed = await client.get("/v1/tasks", params={"key": key, "limit": 10})
    assert listed.status_code == 200, listed.text
    assert listed.json()["cursor"] is None
    [summary] = listed.json()["tasks"]
    assert (summary["id"], summary["keys"], summary["size"]) == (task_id, [key], 7)
    shown = await client.get(f"/v1/tasks/{task_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["payload"] == {"n": 1}
    assert shown.json()["properties"]["message_id"] == task_id
    moved = await client.patch(f"/v1/tasks/{path_key}", json={"delay": "4h"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["due_at"] > made.json()["due_at"]
    missing = await client.get("/v1/tasks/no-such-task")
    assert (missing.status_code, missing.json()["error"]) == (404, "TaskNotPendingError")
    soon = await client.post(
        "/v1/tasks", json={"destination": destination, "payload": 2, "delay": "800ms"}
    )
    too_soon = await client.patch(f"/v1/tasks/{soon.json()['id']}", json={"delay_ms": 60_000})
    assert (too_soon.status_code, too_soon.json()["error"]) == (409, "TaskDueTooSoonError")
    bad = await client.get("/v1/tasks", params={"due_before": "tomorrow"})
    assert bad.status_code == 422
    assert "due_before='tomorrow' is not an RFC 3339 time" in bad.json()["message"]
    counted = await client.delete(f"/v1/keys/{path_key}", params={"count": "true"})
    assert counted.json()["pending"] == 1
    # The task due in 800 ms must be in its work queue (deleted with it), not in a level.
    queue = api_settings.names.work_queue(destination)
    async with asyncio.timeout(10):
        while await depth(api_settings, queue) < 1:  # noqa: ASYNC110 - a queue count
            await asyncio.sleep(0.05)


async def test_delete_cancels_the_tasks_under_a_key(
    api_settings: Settings, destination: str, client: httpx.AsyncClient
) -> None:
    recorder = Recorder()
    key = "user/42 é"  # a slash and non-ASCII: URL-encoded in the path
    async with Scheduler(api_settings) as scheduler:
        await scheduler.declare_destination(destination)
    doomed = await client.post(
        "/v1/tasks",
        json={"destination": destination, "payload": 1, "delay": "500ms", "keys": [key]},
    )
    cancelled = await client.delete(f"/v1/keys/{httpx.URL(path=key).raw_path.decode()}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["key"] == key
    kept = await client.post(
        "/v1/tasks", json={"destination": destination, "payload": 2, "delay": "600ms"}
    )
    async with running_worker(api_settings, destination, recorder) as worker:
        await recorder.wait_for({kept.json()["id"]}, within=30)
        await worker.wait_for(lambda s: s.cancelled >= 1)
    assert doomed.json()["id"] not in recorder.ids


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"destination": "x", "payload": 1}, 422, "exactly one of delay, delay_ms and at"),
        ({"destination": "x", "payload": 1, "delay": "5s", "delay_ms": 5}, 422, "exactly one"),
        ({"destination": "x", "payload": 1, "delay": "soon"}, 422, "'soon'"),
        ({"destination": "x", "payload": 1, "delay_ms": -5}, 422, "-5"),
        ({"destination": "x", "payload": 1, "delay_ms": 10**30}, 422, "delay"),
        ({"destination": "x", "payload": 1, "at": "2026-12-01T08:00:00"}, 422, "naive"),
        ({"destination": "x", "payload": 1, "at": "tomorrow"}, 422, "RFC 3339"),
        ({"destination": "a*b", "payload": 1, "delay": "1s"}, 422, "'*'"),
        ({"destination": "x", "payload": 1, "delay": "1s", "keys": "k"}, 422, "keys"),
        ({"destination": "x", "payload": 1, "delay": "1s", "colour": "red"}, 422, "colour"),
        ({"destination": "no-queue-here", "payload": 1, "delay": "1s"}, 404, "no-queue-here"),
    ],
)
async def test_refusals_carry_the_librarys_message_and_no_traceback(
    client: httpx.AsyncClient, body: dict[str, object], status: int, says: str
) -> None:
    reply = await client.post("/v1/tasks", json=body)
    assert reply.status_code == status, reply.text
    problem = reply.json()
    assert set(problem) == {"error", "message"}
    assert says in problem["message"]
    assert "Traceback" not in reply.text


async def test_malformed_and_deeply_nested_json_are_refused(client: httpx.AsyncClient) -> None:
    broken = await client.post(
        "/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 422
    deep = '{"destination": "x", "delay": "1s", "payload": ' + "[" * 3000 + "]" * 3000 + "}"
    nested = await client.post(
        "/v1/tasks", content=deep, headers={"Content-Type": "application/json"}
    )
    assert nested.status_code in (400, 422), nested.text
    assert "Traceback" not in nested.text


async def test_the_token_is_required_and_compared_whole(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as anonymous:
        body = {"destination": "x", "payload": 1, "delay": "1s"}
        missing = await anonymous.post("/v1/tasks", json=body)
        wrong = await anonymous.post(
            "/v1/tasks", json=body, headers={"Authorization": f"Bearer {TOKEN[:-1]}"}
        )
        basic = await anonymous.delete("/v1/keys/k", headers={"Authorization": f"Basic {TOKEN}"})
        health = await anonymous.get("/healthz")
        schema = await anonymous.get("/openapi.json")
    assert [missing.status_code, wrong.status_code, basic.status_code] == [401, 401, 401]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert schema.status_code == 200
    assert "/v1/tasks" in schema.json()["paths"]


async def test_bodies_over_the_limit_are_refused_with_or_without_a_length(
    client: httpx.AsyncClient,
) -> None:
    big = b'{"destination": "x", "delay": "1s", "payload": "' + b"a" * 200_000 + b'"}'
    declared = await client.post(
        "/v1/tasks", content=big, headers={"Content-Type": "application/json"}
    )

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    streamed = await client.post(
        "/v1/tasks", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "over" in streamed.json()["message"]
    fits_http_not_broker = await client.post(
        "/v1/tasks", json={"destination": "x", "delay": "1s", "payload": "a" * 10_000}
    )
    assert fits_http_not_broker.status_code == 413
    assert "maximum message size" in fits_http_not_broker.json()["message"]


async def test_access_log_has_one_structured_line_and_no_secret(
    client: httpx.AsyncClient,
) -> None:
    loop, written = asyncio.get_running_loop(), asyncio.Event()
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        # Signalled after the record is kept: the server writes it on a thread of its own.
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            loop.call_soon_threadsafe(written.set)

    access, collect = logging.getLogger("rmqdelay.http.access"), Collect()
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(collect)
    try:
        reply = await client.delete("/v1/keys/some-key?until=2h")
        await asyncio.wait_for(written.wait(), 10)
        written.clear()
        # A key that would forge a second log line, or write a NUL.
        forged = await client.delete("/v1/keys/k%0A2026-12-04%20ERROR%20forged%00x")
        await asyncio.wait_for(written.wait(), 10)
        written.clear()
        # Not UTF-8: refused, not read as U+FFFD (which would cancel another key).
        not_utf8 = await client.delete("/v1/keys/k%ff")
        await asyncio.wait_for(written.wait(), 10)
    finally:
        access.removeHandler(collect)
        access.setLevel(level)
    assert reply.status_code == 200
    record, forging, refused = records
    assert record.method == "DELETE"  # type: ignore[attr-defined]
    assert record.path == "/v1/keys/some-key"  # type: ignore[attr-defined]
    assert record.status == 200  # type: ignore[attr-defined]
    assert record.request_id == reply.headers["x-request-id"]  # type: ignore[attr-defined]
    text = logging.Formatter().format(record) + repr(vars(record))
    assert TOKEN not in text
    assert "until" not in text, "query strings stay out of the log"
    line = TextFormatter(Redactor()).format(record)
    assert "DELETE /v1/keys/some-key 200 " in line
    assert f"client 127.0.0.1 request {reply.headers['x-request-id']}" in line
    assert " ms " in line, "the duration, in the text format too"
    assert forged.status_code == 200
    forged_line = TextFormatter(Redactor()).format(forging)
    assert "\n" not in forged_line
    assert "\x00" not in forged_line
    assert "k\\n2026-12-04 ERROR forged\\x00x" in forged_line
    assert not_utf8.status_code == 400
    assert not_utf8.json()["message"] == "the path is not UTF-8 text once percent-decoded"
    assert refused.status == 400  # type: ignore[attr-defined]


async def test_healthz_says_503_within_seconds_of_losing_the_broker_and_200_once_back(
    api_settings: Settings,
) -> None:
    async def health(client: httpx.AsyncClient) -> int:
        return (await client.get("/healthz")).status_code

    async def until(client: httpx.AsyncClient, status: int, within: float) -> float:
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(within):
            while await health(client) != status:  # noqa: ASYNC110 - a load balancer polls too
                await asyncio.sleep(0.2)
        return asyncio.get_running_loop().time() - started

    async with Proxy(api_settings.url) as proxy:
        via_proxy = api_settings.model_copy(
            update={"url": proxy.url, "publish_deadline": timedelta(seconds=1)}
        )
        auth = {"Authorization": f"Bearer {TOKEN}"}
        server = Server(via_proxy)
        # Started off this loop: the proxy it connects through runs on it.
        url = await asyncio.to_thread(server.__enter__)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30, headers=auth) as client:
                assert await health(client) == 200
                await proxy.down()
                assert await until(client, 503, 5) < 5
                body = (await client.get("/healthz")).json()
                assert body["error"] == "BrokerUnavailable"
                assert "127.0.0.1" not in body["message"], "no host for API clients"
                refused = await client.post(
                    "/v1/tasks", json={"destination": "d", "payload": {}, "delay": "1s"}
                )
                assert refused.status_code == 503
                for private in ("127.0.0.1", "guest", "%2F", f":{urlsplit(proxy.url).port}"):
                    assert private not in refused.json()["message"], private
                await proxy.up()
                await until(client, 200, 30)
                proxy.stall()  # silent: the link still looks up, only no answer comes
                assert await until(client, 503, 10) < 10
                proxy.resume()
                await until(client, 200, 30)
        finally:
            await asyncio.to_thread(server.__exit__)


def test_serving_beyond_loopback_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "t")
    for host in ("0.0.0.0", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigError, match="RMQDELAY_HTTP_TOKEN"):
            check_bind(host, None)


def test_cli_refuses_a_public_address_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RMQDELAY_HTTP_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "without RMQDELAY_HTTP_TOKEN" in capsys.readouterr().err


def test_the_command_line_asks_a_running_serve_when_told_where(
    api_settings: Settings,
    base_url: str,
    destination: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With RMQDELAY_API_URL, ``tasks list|show`` and ``reschedule`` go through the API
    (the broker URL the command has goes nowhere, so nothing else could answer), print
    what they print without it, and fail as they would: the API's error is theirs."""
    incident = f"incident:{uuid.uuid4().hex[:8]}"
    with SyncScheduler(api_settings) as scheduler:
        scheduler.declare_destination(destination)
        task = scheduler.schedule(destination, {"n": 1}, delay=3600, keys=[incident])
    use_in_cli(monkeypatch, api_settings)
    monkeypatch.setenv("RMQDELAY_URL", "amqp://guest:guest@127.0.0.1:9/%2F")
    monkeypatch.setenv("RMQDELAY_CONNECT_TIMEOUT", "1s")
    monkeypatch.setenv("RMQDELAY_API_URL", base_url)
    monkeypatch.setenv("RMQDELAY_HTTP_TOKEN", TOKEN)

    assert main(["tasks", "list", "--key", incident, "--json"]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["id"], listed["keys"], listed["destination"]) == (
        task.id, [incident], destination,
    )  # fmt: skip
    assert main(["tasks", "list", "--key", incident]) == 0
    assert capsys.readouterr().out.startswith(f"{task.id}  {destination}  ")
    assert main(["tasks", "show", task.id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["payload"] == {"n": 1}
    assert main(["reschedule", incident, "--delay", "2h"]) == 0
    assert capsys.readouterr().out.startswith(f"rescheduled {task.id} for {destination}")
    assert main(["tasks", "show", task.id, "--json"]) == 0
    due = datetime.fromisoformat(json.loads(capsys.readouterr().out)["due_at"])
    assert due > task.due_at + timedelta(minutes=50)

    assert main(["tasks", "show", "no-such-task"]) != 0
    assert "no pending task" in capsys.readouterr().err
    monkeypatch.setenv("RMQDELAY_HTTP_TOKEN", "not-the-token")
    assert main(["tasks", "list"]) != 0
    err = capsys.readouterr().err
    assert "refused the token" in err
    assert "not-the-token" not in err


# --- fuzzing from the OpenAPI document ----------------------------------------------------


def test_fuzzing_from_the_openapi_document(base_url: str) -> None:
    """Whatever the schema allows, and what it does not: never a 5xx, every answer as
    documented (status, content type, body schema), against the real broker."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= {
        ("POST", "/v1/tasks"),
        ("DELETE", "/v1/keys/{key}"),
        ("GET", "/healthz"),
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=80, deadline=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKEN}"},
                # Some refusals depend on what a schema cannot say (a due time past the
                # maximum delay, a key's length in bytes, a destination with no queue):
                # those are 4xx for schema-valid input, and say why.
                excluded_checks=[positive_data_acceptance],
            )

        check()
