import random
import tracemalloc

import pytest

from rmqdelay.core.cancelset import CancelSet, Stamps
from rmqdelay.core.errors import InvalidKeyError, MessageDecodeError
from rmqdelay.core.wire import (
    KEYS,
    cancel_headers,
    check_keys,
    decode_cancel,
    decode_snapshot_part,
    decode_task,
    encode_snapshot_part,
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
    assert cancels.expire(now_ms=1899) == 0, "never forgotten before its record expires"
    assert cancels.expire(now_ms=2000) == 2  # kept to the next whole second at most
    assert len(cancels) == 0


def test_a_record_already_past_the_horizon_is_not_added() -> None:
    cancels = CancelSet(retention_ms=1000)
    assert not cancels.add("k", at_ms=0, now_ms=5000)
    assert len(cancels) == 0


def test_a_cancel_with_an_until_is_forgotten_then_not_before() -> None:
    cancels = CancelSet(retention_ms=86_400_000)
    assert cancels.add("short", at_ms=1000, now_ms=1000, until_ms=6000)
    cancels.add("long", at_ms=1000, now_ms=1000)  # until: at + retention
    assert cancels.expire(now_ms=5999) == 0
    assert cancels.cancelled_by(["short"], published_ms=900) == "short"
    assert cancels.expire(now_ms=6000) == 1
    assert cancels.cancelled_by(["short"], published_ms=900) is None
    assert cancels.cancelled_by(["long"], published_ms=900) == "long"
    assert not cancels.add("stale", at_ms=1000, now_ms=7000, until_ms=6999)


def test_an_until_beyond_the_retention_is_cut_to_it() -> None:
    cancels = CancelSet(retention_ms=1000)
    cancels.add("k", at_ms=0, now_ms=0, until_ms=10**12)
    assert [until for _, _, until in cancels.items()] == [1000]


def test_a_key_cancelled_again_keeps_the_later_stamp_and_the_later_until() -> None:
    cancels = CancelSet(retention_ms=86_400_000)
    cancels.add("k", at_ms=1000, now_ms=1000, until_ms=100_000)
    cancels.add("k", at_ms=2000, now_ms=2000, until_ms=5000)
    assert cancels.expire(now_ms=50_000) == 0
    assert cancels.cancelled_by(["k"], published_ms=1500) == "k"
    assert cancels.expire(now_ms=100_000) == 1


@pytest.mark.parametrize("seed", range(5))
def test_expiry_is_never_early_and_at_most_a_little_late(seed: int) -> None:
    rng = random.Random(seed)
    cancels, untils = CancelSet(retention_ms=10 * 365 * 86_400_000), {}
    for i in range(2000):
        until = rng.randint(1, 10 * 365 * 86_400_000)
        cancels.add(f"k{i}", at_ms=0, now_ms=0, until_ms=until)
        untils[f"k{i}"] = until
    assert len(cancels._buckets) < 8000, "buckets stay few however untils spread"
    for now in sorted(rng.sample(range(10 * 365 * 86_400_000), 50)):
        cancels.expire(now)
        live = {key for key, _, _ in cancels.items()}
        assert {k for k, u in untils.items() if u > now} <= live, "forgotten too early"
        late = [untils[k] for k in live if untils[k] <= now]
        assert all(now - u <= max(1000, (u - 0) // 128) for u in late), "kept far too long"


def test_items_list_every_live_key_for_a_snapshot() -> None:
    cancels = CancelSet(retention_ms=1_000_000)
    cancels.add("a", at_ms=10, now_ms=10, until_ms=2000)
    cancels.add("b", at_ms=20, now_ms=20)
    (a, b) = sorted(cancels.items())
    assert a == ("a", 10, 2000)
    assert b[:2] == ("b", 20)
    assert 1_000_020 <= b[2] <= 1_000_020 * 1.004, "rounded up to its bucket, a little"


def test_a_live_key_costs_about_250_bytes() -> None:
    tracemalloc.start()
    cancels = CancelSet(retention_ms=10 * 365 * 86_400_000)
    before = tracemalloc.get_traced_memory()[0]
    keys = [f"order:{i:032d}" for i in range(20_000)]
    after_keys = tracemalloc.get_traced_memory()[0]
    for i, key in enumerate(keys):
        cancels.add(key, at_ms=1_700_000_000_000 + i, now_ms=1_700_000_000_000)
    per_key = (tracemalloc.get_traced_memory()[0] - after_keys) / len(keys)
    tracemalloc.stop()
    key_size = (after_keys - before) / len(keys)
    assert per_key < 120, f"{per_key:.0f} bytes per key besides the key's own {key_size:.0f}"


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
    t = 1_763_900_000_000  # plausible epoch milliseconds
    headers = task_headers(
        "id", due_ms=t + 5, published_ms=t + 7, route=route_headers(()), keys=("a", "b")
    )
    task = decode_task(
        headers=headers, body=b"{}", content_type="application/json", routing_key="d"
    )
    assert task.keys == ("a", "b")
    assert published_ms(task) == t + 7
    assert decode_cancel(cancel_headers("a", t + 9)) == ("a", t + 9, None)
    assert decode_cancel(cancel_headers("a", t + 9, t + 20)) == ("a", t + 9, t + 20)


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


def test_snapshot_parts_roundtrip_and_refuse_anything_else() -> None:
    entries = [("k", 1, 2), ('ключ with "quotes"', 3, 4)]
    assert decode_snapshot_part(encode_snapshot_part(entries)) == entries
    for bad in (b"{", b"{}", b'[["k", 1]]', b'[["k", 1, true]]', b"[[1, 1, 2]]"):
        with pytest.raises(MessageDecodeError):
            decode_snapshot_part(bad)
