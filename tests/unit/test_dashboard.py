"""The dashboard's pure parts: sessions and CSRF tokens, where a login may lead, what a
typed time means, how a payload is shown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from rmqdelay.core.errors import InvalidDelayError
from rmqdelay.web.dashboard.pages import SHOWN_BYTES, _next, _payload, _time_or_delay
from rmqdelay.web.dashboard.session import SESSION_S, Sessions

NOW = 1_800_000_000.0


def test_a_session_is_accepted_by_every_server_with_the_token_and_no_other() -> None:
    session = Sessions("tok").issue(NOW)
    assert Sessions("tok").check(session.cookie, NOW + 5) == session
    assert Sessions("other").check(session.cookie, NOW + 5) is None
    assert "tok" not in session.cookie


@pytest.mark.parametrize("age_s", [-1, SESSION_S, SESSION_S + 1])
def test_a_session_from_the_future_or_too_old_is_refused(age_s: int) -> None:
    sessions = Sessions("tok")
    assert sessions.check(sessions.issue(NOW).cookie, NOW + age_s) is None


@pytest.mark.parametrize(
    "cookie", [None, "", "x", "1.2", "abc.def.0123", "1.a.b.c", "9" * 300, "1800000000.ab."]
)
def test_a_malformed_cookie_is_no_session(cookie: str | None) -> None:
    assert Sessions("tok").check(cookie, NOW) is None


def test_a_forged_cookie_is_refused() -> None:
    sessions = Sessions("tok")
    issued, nonce, mac = sessions.issue(NOW).cookie.split(".")
    assert sessions.check(f"{issued}.{nonce}.{'0' * len(mac)}", NOW) is None
    assert sessions.check(f"{int(issued) + 1}.{nonce}.{mac}", NOW) is None


def test_the_csrf_token_is_the_sessions_own() -> None:
    sessions = Sessions("tok")
    one, two = sessions.issue(NOW), sessions.issue(NOW)
    assert one.csrf != two.csrf
    assert sessions.csrf_ok(one, one.csrf)
    assert not sessions.csrf_ok(one, two.csrf)
    assert not sessions.csrf_ok(one, None)
    assert not sessions.csrf_ok(one, "")


def test_without_a_token_sessions_need_no_login_and_stay_per_process() -> None:
    first, second = Sessions(None), Sessions(None)
    assert not first.login_required
    assert first.token_ok(None)
    assert second.check(first.issue(NOW).cookie, NOW) is None
    assert Sessions("tok").login_required
    assert not Sessions("tok").token_ok(None)
    assert not Sessions("tok").token_ok("to")


@pytest.mark.parametrize(
    ("given", "goes"),
    [
        ("/tasks?key=a", "/tasks?key=a"),
        ("//evil.example/x", "/"),
        ("https://evil.example", "/"),
        ("/\\evil.example", "/"),
        (None, "/"),
        ("", "/"),
    ],
)
def test_a_login_leads_only_to_a_path_of_this_site(given: str | None, goes: str) -> None:
    assert _next(given) == goes


def test_a_typed_time_is_a_duration_or_a_time_utc_unless_told() -> None:
    assert _time_or_delay("30m", "x") == (None, timedelta(minutes=30))
    assert _time_or_delay(" ", "x") == (None, None)
    assert _time_or_delay("2027-01-02T03:04", "x") == (
        datetime(2027, 1, 2, 3, 4, tzinfo=UTC),
        None,
    )
    at, _ = _time_or_delay("2027-01-02T03:04:00+01:00", "x")
    assert at == datetime(2027, 1, 2, 2, 4, tzinfo=UTC)
    with pytest.raises(InvalidDelayError, match="'soon' is neither a duration"):
        _time_or_delay("soon", "due before")


def test_a_payload_is_shown_as_json_text_or_base64_and_cut_when_large() -> None:
    assert _payload(b'{"a":1}', "application/json")["text"] == '{\n  "a": 1\n}'
    assert _payload(b"plain", "text/plain") == {
        "text": "plain", "encoding": "text", "cut": False, "size": 5,
    }  # fmt: skip
    assert _payload(b"\xff\x00", None)["encoding"] == "base64 (not UTF-8)"
    assert _payload(b"{not json", "application/json")["text"] == "{not json"
    big = _payload(b"x" * (SHOWN_BYTES + 10), "text/plain")
    assert big["cut"]
    assert len(big["text"]) == SHOWN_BYTES
