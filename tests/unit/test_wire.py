import json
import math
from datetime import UTC, datetime

import pytest

from rmqdelay.core.errors import InvalidPayloadError, MessageDecodeError
from rmqdelay.core.wire import (
    ATTEMPT,
    DUE_MS,
    KEYS,
    PUBLISHED_MS,
    TASK_ID,
    decode_task,
    encode_payload,
    parked_headers,
    rescheduled_headers,
    route_headers,
    strip_broker_headers,
    task_headers,
)


def test_route_headers_chain_levels_then_work() -> None:
    assert route_headers((5, 2, 0)) == {
        "rmqdelay-route-in": "5",
        "rmqdelay-route-5": "2",
        "rmqdelay-route-2": "0",
        "rmqdelay-route-0": "work",
    }
    assert route_headers(()) == {"rmqdelay-route-in": "work"}


def test_task_headers_use_integer_milliseconds() -> None:
    headers = task_headers(
        "id1", due_ms=1_763_900_000_123, published_ms=1_763_900_000_000, route=route_headers((1,))
    )
    assert headers[DUE_MS] == 1_763_900_000_123
    assert isinstance(headers[DUE_MS], int)
    assert headers[PUBLISHED_MS] == 1_763_900_000_000
    assert headers[TASK_ID] == "id1"
    assert headers[ATTEMPT] == 1


@pytest.mark.parametrize("payload", [{"incident": 42}, [1, "x"], "text", 3, None, {"ü": "✓"}])
def test_json_payloads_roundtrip(payload: object) -> None:
    body, content_type = encode_payload(payload, None)
    assert content_type == "application/json"
    task = decode_task(
        headers=task_headers("i", due_ms=1000, published_ms=0, route=route_headers(())),
        body=body,
        content_type=content_type,
        routing_key="alarms",
    )
    assert task.payload == payload
    assert task.due_at == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert (task.id, task.destination, task.attempt) == ("i", "alarms", 1)


def test_bytes_need_a_content_type_and_come_back_as_bytes() -> None:
    with pytest.raises(InvalidPayloadError, match="content_type"):
        encode_payload(b"\x00\x01", None)
    body, content_type = encode_payload(b"\x00\x01", "application/octet-stream")
    task = decode_task(
        headers=task_headers("i", due_ms=0, published_ms=0, route=route_headers(())),
        body=body,
        content_type=content_type,
        routing_key="d",
    )
    assert task.payload == b"\x00\x01"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [({1, 2}, "set"), (object(), "object"), (math.nan, "JSON"), ({"x": math.inf}, "JSON")],
)
def test_non_json_payloads_are_refused_naming_the_problem(payload: object, fragment: str) -> None:
    with pytest.raises(InvalidPayloadError, match=fragment):
        encode_payload(payload, None)


def test_content_type_with_a_non_bytes_payload_is_refused() -> None:
    with pytest.raises(InvalidPayloadError, match="text/plain"):
        encode_payload({"a": 1}, "text/plain")


GOOD = task_headers("i", due_ms=0, published_ms=0, route=route_headers(()))


@pytest.mark.parametrize(
    ("headers", "body", "content_type", "fragment"),
    [
        (GOOD, b"{", "application/json", "not valid JSON"),
        (GOOD, b"{}", None, "content_type"),
        ({**GOOD, TASK_ID: ""}, b"{}", "application/json", TASK_ID),
        ({k: v for k, v in GOOD.items() if k != DUE_MS}, b"{}", "application/json", DUE_MS),
        ({**GOOD, DUE_MS: "soon"}, b"{}", "application/json", DUE_MS),
        ({**GOOD, ATTEMPT: 0}, b"{}", "application/json", ATTEMPT),
        ({**GOOD, PUBLISHED_MS: 1.5}, b"{}", "application/json", PUBLISHED_MS),
        (None, b"{}", "application/json", TASK_ID),
    ],
)
def test_decode_says_what_is_wrong(
    headers: dict[str, object] | None, body: bytes, content_type: str | None, fragment: str
) -> None:
    with pytest.raises(MessageDecodeError, match=fragment):
        decode_task(headers=headers, body=body, content_type=content_type, routing_key="d")


def test_json_content_type_parameters_are_accepted() -> None:
    task = decode_task(
        headers=GOOD,
        body=json.dumps([1]).encode(),
        content_type="application/json; charset=utf-8",
        routing_key="d",
    )
    assert task.payload == [1]


def test_parked_headers_strip_death_bookkeeping_and_say_why() -> None:
    original = {**GOOD, "x-death": [{}], "x-first-death-queue": "q", "x-last-death-reason": "r"}
    parked = parked_headers(
        original,
        reason="ValueError: " + "x" * 5000,
        error="ValueError",
        attempts=3,
        destination="d",
        now_ms=7,
        source="q",
    )
    assert not any(k.startswith(("x-death", "x-first-death", "x-last-death")) for k in parked)
    assert parked["rmqdelay-parked-reason"].startswith("ValueError: ")
    assert len(parked["rmqdelay-parked-reason"]) == 1000
    assert parked["rmqdelay-parked-at"] == 7
    assert parked[TASK_ID] == "i"
    assert strip_broker_headers({"x-death": 1, "a": 2}) == {"a": 2}


def test_every_header_of_the_brokers_bookkeeping_is_stripped_and_nothing_else() -> None:
    headers = {
        "x-death": [{"queue": "q"}],
        "x-first-death-reason": "expired",
        "x-first-death-queue": "q",
        "x-first-death-exchange": "",
        "x-last-death-reason": "delivery_limit",
        "x-last-death-queue": "q",
        "x-last-death-exchange": "",
        "x-delivery-count": 21,  # a quorum queue's redeliveries (3.10 and later)
        "x-acquired-count": 21,  # RabbitMQ 4.3: every acquisition
        "x-delay": 5000,  # a publisher's own, kept here (relay.py decides about it)
        "x-custom": "mine",
        "rmqdelay-id": "t",
    }
    assert strip_broker_headers(headers) == {
        "x-delay": 5000,
        "x-custom": "mine",
        "rmqdelay-id": "t",
    }
    for parked in (
        parked_headers(
            headers, reason="r", error="E", attempts=1, destination="d", now_ms=1, source="s"
        ),
        rescheduled_headers(headers, attempt=1, due_ms=2, route={}),
    ):
        assert not set(parked) & {"x-delivery-count", "x-acquired-count", "x-death"}


def test_rescheduled_headers_keep_identity_and_stamp_but_replace_the_route() -> None:
    original = {
        **task_headers("i", due_ms=10, published_ms=5, route=route_headers((7, 2)), keys=("k",)),
        "x-death": [{}],
        "rmqdelay-parked-reason": "old",
    }
    again = rescheduled_headers(original, attempt=2, due_ms=99, route=route_headers((1,)))
    assert again[TASK_ID] == "i"
    assert again[PUBLISHED_MS] == 5  # a cancel of the original still hits the retry
    assert again[KEYS] == ["k"]
    assert (again[ATTEMPT], again[DUE_MS]) == (2, 99)
    assert {k for k in again if k.startswith("rmqdelay-route-")} == {
        "rmqdelay-route-in",
        "rmqdelay-route-1",
    }
    assert "x-death" not in again
    assert "rmqdelay-parked-reason" not in again


def test_content_types_outside_accept_are_refused() -> None:
    with pytest.raises(MessageDecodeError, match="application/xml"):
        decode_task(headers=GOOD, body=b"<x/>", content_type="application/xml", routing_key="d")
    task = decode_task(
        headers=GOOD,
        body=b"<x/>",
        content_type="application/xml",
        routing_key="d",
        accept=frozenset({"application/xml"}),
    )
    assert task.payload == b"<x/>"
