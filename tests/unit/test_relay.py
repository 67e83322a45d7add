"""What the bridge keeps of a plugin user's message, and what the forwarder gives back."""

from __future__ import annotations

from decimal import Decimal

import pytest

from rmqdelay.core.errors import InvalidDelayError
from rmqdelay.core.relay import (
    PLUGIN_MAX_DELAY_MS,
    bridged_headers,
    forward_routing_key,
    forwarded_headers,
    plugin_delay_ms,
    restored_delivery_mode,
    restored_expiration,
)


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (None, 0),
        (5000, 5000),
        (0, 0),
        (-300, 0),  # the plugin routes a negative delay at once
        ("2500", 2500),  # it parses decimal strings
        (b" 42 ", 42),
        (1500.9, 1500),  # and truncates floats
        (Decimal("7.5"), 7),
        (PLUGIN_MAX_DELAY_MS + 1, PLUGIN_MAX_DELAY_MS + 1),  # honoured, where the plugin gave up
    ],
)
def test_x_delay_is_read_as_the_plugin_reads_it(value: object, ms: int) -> None:
    headers = {} if value is None else {"x-delay": value}
    assert plugin_delay_ms(headers) == ms


def test_no_headers_at_all_means_now() -> None:
    assert plugin_delay_ms(None) == 0


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("soon", "'soon'"),
        (True, "True"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ([1, 2], "list"),
        ({"ms": 5}, "dict"),
    ],
)
def test_an_unreadable_x_delay_is_refused_by_name(value: object, named: str) -> None:
    with pytest.raises(InvalidDelayError, match="x-delay") as caught:
        plugin_delay_ms({"x-delay": value})
    assert named in str(caught.value)


def test_a_huge_string_delay_is_quoted_short() -> None:
    with pytest.raises(InvalidDelayError) as caught:
        plugin_delay_ms({"x-delay": "z" * 10_000})
    assert len(str(caught.value)) < 200


def test_bridged_headers_keep_the_publishers_and_drop_impostors() -> None:
    original = {
        "x-delay": 5000,
        "trace": "t1",
        "rmqdelay-keys": ["forged"],  # a publisher cannot pose as rmqdelay
        "x-death": [{"queue": "q"}],
    }
    kept = bridged_headers(
        original, routing_key="eu.orders", expiration="60000", delivery_mode=1, delay_ms=5000
    )
    assert kept["trace"] == "t1"
    assert "x-delay" not in kept
    assert "x-death" not in kept
    assert "rmqdelay-keys" not in kept
    assert forward_routing_key(kept, "default") == "eu.orders"
    assert restored_expiration(kept) == "60000"
    assert restored_delivery_mode(kept) == 1


def test_forwarded_headers_are_the_publishers_with_x_delay_negated() -> None:
    stored = bridged_headers(
        {"x-delay": 5000, "trace": "t1"},
        routing_key="k",
        expiration=None,
        delivery_mode=None,
        delay_ms=5000,
    )
    stored |= {
        "rmqdelay-id": "t",
        "rmqdelay-route-in": "3",
        "x-death": [],
        "x-first-death-queue": "q",
        "x-delivery-count": 2,
    }
    assert forwarded_headers(stored) == {"trace": "t1", "x-delay": -5000}
    assert restored_expiration(stored) is None
    assert restored_delivery_mode(stored) is None


def test_a_task_that_was_not_bridged_forwards_plainly() -> None:
    headers = {"rmqdelay-id": "t", "app": "x"}
    assert forwarded_headers(headers) == {"app": "x"}
    assert forward_routing_key(headers, "dest") == "dest"
    assert forward_routing_key(None, "dest") == "dest"


@pytest.mark.parametrize("odd", [0, 3, "2", True, None])
def test_only_a_real_delivery_mode_is_restored(odd: object) -> None:
    assert restored_delivery_mode({"rmqdelay-forward-delivery-mode": odd}) is None
