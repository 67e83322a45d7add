import json
import math
from datetime import UTC, datetime

import pytest

from rmqdelay.core.errors import InvalidPayloadError, MessageDecodeError
from rmqdelay.core.wire import (
    ATTEMPT,
    DUE_MS,
    EARLIEST_MS,
    JSON,
    KEYS,
    LATEST_MS,
    PUBLISHED_MS,
    TASK_ID,
    cancel_headers,
    decode_cancel,
    decode_task,
    encode_payload,
    ms_to_datetime,
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


#: A plausible time in milliseconds since the epoch (2025-11-23 12:13:20 UTC).
T_MS = 1_763_900_000_000


def test_task_headers_use_integer_milliseconds() -> None:
    headers = task_headers(
        "id1", due_ms=1_763_900_000_123, published_ms=1_763_900_000_000, route=route_headers((1,))
    )
    assert headers[DUE_MS] == 1_763_900_000_123
    assert isinstance(headers[DUE_MS], int)
    assert headers[PUBLISHED_MS] == 1_763_900_000_000
    assert headers[TASK_ID] == "id1"
    assert ATTEMPT not in headers, "the default attempt is left out"
    assert KEYS not in headers, "no keys, no header"
    task = decode_task(headers=headers, body=b"{}", content_type=JSON, routing_key="d")
    assert (task.attempt, task.keys) == (1, ())
    later = task_headers("id1", due_ms=1, published_ms=1, route={}, attempt=3, keys=("k",))
    assert (later[ATTEMPT], later[KEYS]) == (3, ["k"])


@pytest.mark.parametrize("payload", [{"incident": 42}, [1, "x"], "text", 3, None, {"ü": "✓"}])
def test_json_payloads_roundtrip(payload: object) -> None:
    body, content_type = encode_payload(payload, None)
    assert content_type == "application/json"
    task = decode_task(
        headers=task_headers("i", due_ms=T_MS + 1000, published_ms=T_MS, route=route_headers(())),
        body=body,
        content_type=content_type,
        routing_key="alarms",
    )
    assert task.payload == payload
    assert task.due_at == datetime(2025, 11, 23, 12, 13, 21, tzinfo=UTC)
    assert (task.id, task.destination, task.attempt) == ("i", "alarms", 1)


def test_bytes_need_a_content_type_and_come_back_as_bytes() -> None:
    with pytest.raises(InvalidPayloadError, match="content_type"):
        encode_payload(b"\x00\x01", None)
    body, content_type = encode_payload(b"\x00\x01", "application/octet-stream")
    task = decode_task(
        headers=task_headers("i", due_ms=T_MS, published_ms=T_MS, route=route_headers(())),
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


GOOD = task_headers("i", due_ms=T_MS, published_ms=T_MS, route=route_headers(()))


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
        **task_headers(
            "i", due_ms=T_MS + 10, published_ms=T_MS + 5, route=route_headers((7, 2)), keys=("k",)
        ),
        "x-death": [{}],
        "rmqdelay-parked-reason": "old",
    }
    again = rescheduled_headers(original, attempt=2, due_ms=99, route=route_headers((1,)))
    assert again[TASK_ID] == "i"
    assert again[PUBLISHED_MS] == T_MS + 5  # a cancel of the original still hits the retry
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


@pytest.mark.parametrize(
    ("due", "says"),
    [
        (T_MS // 1000, "would be one in seconds"),
        (T_MS * 1000, "would be one in microseconds"),
        (T_MS * 1_000_000, "would be one in nanoseconds"),
        (-5, "a time before 1970"),
        (0, "not a plausible time"),
        (10**17, "not a plausible time"),
    ],
)
def test_a_time_in_another_unit_is_refused_naming_the_likely_mistake(due: int, says: str) -> None:
    headers = task_headers("i", due_ms=due, published_ms=T_MS, route=route_headers(()))
    with pytest.raises(MessageDecodeError, match=f"'rmqdelay-due' is {due}: .*{says}"):
        decode_task(headers=headers, body=b"{}", content_type=JSON, routing_key="d")
    stamped = task_headers("i", due_ms=T_MS, published_ms=due, route=route_headers(()))
    with pytest.raises(MessageDecodeError, match="'rmqdelay-published'"):
        decode_task(headers=stamped, body=b"{}", content_type=JSON, routing_key="d")
    with pytest.raises(MessageDecodeError, match=says):
        decode_cancel(cancel_headers("k", due))
    with pytest.raises(MessageDecodeError, match=says):
        decode_cancel(cancel_headers("k", T_MS, due))


def test_plausible_times_pass_from_2000_to_2200() -> None:
    for due in (EARLIEST_MS, T_MS, LATEST_MS):
        headers = task_headers("i", due_ms=due, published_ms=T_MS, route=route_headers(()))
        task = decode_task(headers=headers, body=b"{}", content_type=JSON, routing_key="d")
        assert task.due_at == ms_to_datetime(due)


@pytest.mark.parametrize(
    ("keys", "task_id", "says"),
    [
        ([f"k{n}" for n in range(33)], "i", "at most 32 keys"),
        (["x" * 256], "i", "256 bytes; the limit is 255"),
        (["é" * 128], "i", "256 bytes; the limit is 255"),
        ([], "y" * 300, "the task id 'yyy"),
    ],
)
def test_the_worker_holds_ids_and_keys_to_the_wire_formats_limits(
    keys: list[str], task_id: str, says: str
) -> None:
    headers = {
        **task_headers(task_id, due_ms=T_MS, published_ms=T_MS, route=route_headers(())),
        KEYS: keys,
    }
    with pytest.raises(MessageDecodeError, match=says):
        decode_task(headers=headers, body=b"{}", content_type=JSON, routing_key="d")
    headers[KEYS] = keys[:32] if len(keys) > 32 else []
    if len(task_id) <= 255:
        decode_task(headers=headers, body=b"{}", content_type=JSON, routing_key="d")
