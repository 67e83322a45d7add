import pytest

from rmqdelay.core.cancelset import CancelSet, Stamps
from rmqdelay.core.errors import InvalidKeyError, MessageDecodeError
from rmqdelay.core.wire import (
    KEYS,
    cancel_headers,
    check_keys,
    decode_cancel,
    decode_task,
    published_ms,
    route_headers,
    task_headers,
)


def test_a_cancel_hits_tasks_published_up_to_it_and_not_after() -> None:
    cancels = CancelSet(retention_ms=10_000)
    cancels.add("incident:42", at_ms=1000, now_ms=1000)
    assert cancels.cancelled_by(["incident:42"], published_ms=999) == "incident:42"
    assert cancels.cancelled_by(["incident:42"], published_ms=1000) == "incident:42"
    assert cancels.cancelled_by(["incident:42"], published_ms=1001) is None
    assert cancels.cancelled_by(["other"], published_ms=0) is None


def test_the_latest_cancel_of_a_key_counts() -> None:
    cancels = CancelSet(retention_ms=10_000)
    cancels.add("k", at_ms=2000, now_ms=2000)
    cancels.add("k", at_ms=1000, now_ms=2000)  # an older record arriving late
    assert cancels.cancelled_by(["k"], published_ms=1500) == "k"


def test_any_key_or_the_id_cancels() -> None:
    cancels = CancelSet(retention_ms=10_000)
    cancels.add("task-id", at_ms=50, now_ms=50)
    assert cancels.cancelled_by(["task-id", "a", "b"], published_ms=10) == "task-id"
    cancels.add("b", at_ms=60, now_ms=60)
    assert cancels.cancelled_by(["x", "b"], published_ms=10) == "b"


def test_cancels_past_the_retention_are_forgotten_but_newer_ones_kept() -> None:
    cancels = CancelSet(retention_ms=1000)
    cancels.add("old", at_ms=0, now_ms=0)
    cancels.add("renewed", at_ms=0, now_ms=0)
    cancels.add("renewed", at_ms=900, now_ms=900)
    cancels.add("new", at_ms=900, now_ms=900)
    assert cancels.expire(now_ms=1500) == 1
    assert cancels.cancelled_by(["old"], published_ms=0) is None
    assert cancels.cancelled_by(["renewed"], published_ms=0) == "renewed"
    assert len(cancels) == 2
    assert cancels.expire(now_ms=1901) == 2
    assert len(cancels) == 0


def test_a_record_already_past_the_horizon_is_not_added() -> None:
    cancels = CancelSet(retention_ms=1000)
    assert not cancels.add("k", at_ms=0, now_ms=5000)
    assert len(cancels) == 0


def test_stamps_order_a_schedule_after_a_cancel_in_the_same_millisecond() -> None:
    stamps = Stamps()
    published = stamps.publish(now_ms=100)
    cancelled = stamps.cancel(now_ms=100)
    rescheduled = stamps.publish(now_ms=100)
    assert published <= cancelled < rescheduled


def test_stamps_hold_order_when_the_clock_steps_back() -> None:
    stamps = Stamps()
    published = stamps.publish(now_ms=1000)
    cancelled = stamps.cancel(now_ms=900)
    assert cancelled >= published
    assert stamps.publish(now_ms=800) > cancelled


def test_keys_roundtrip_through_the_headers() -> None:
    headers = task_headers("id", due_ms=5, published_ms=7, route=route_headers(()), keys=("a", "b"))
    task = decode_task(
        headers=headers, body=b"{}", content_type="application/json", routing_key="d"
    )
    assert task.keys == ("a", "b")
    assert published_ms(task) == 7
    assert decode_cancel(cancel_headers("a", 9)) == ("a", 9)


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ("incident:42", "list of strings"),
        ([""], "non-empty"),
        ([1], "non-empty string"),
        (["x" * 256], "256 bytes"),
        ([f"k{i}" for i in range(33)], "at most 32"),
    ],
)
def test_bad_keys_are_refused(keys: object, fragment: str) -> None:
    with pytest.raises(InvalidKeyError, match=fragment):
        check_keys(keys)


def test_duplicate_keys_collapse_in_order() -> None:
    assert check_keys(["b", "a", "b"]) == ("b", "a")


def test_malformed_keys_header_or_cancel_record_is_refused() -> None:
    headers = {
        **task_headers("id", due_ms=0, published_ms=0, route=route_headers(())),
        KEYS: "not-a-list",
    }
    with pytest.raises(MessageDecodeError, match=KEYS):
        decode_task(headers=headers, body=b"{}", content_type="application/json", routing_key="d")
    with pytest.raises(MessageDecodeError, match="rmqdelay-cancel-at"):
        decode_cancel({"rmqdelay-cancel-key": "k"})
