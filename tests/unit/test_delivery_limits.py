"""Which delivery limit a queue has, by version, and which queues status warns about."""

from __future__ import annotations

from typing import Any

import pytest

from rmqdelay.core.delivery_limits import effective_limit, limit_troubles, parse_version
from rmqdelay.core.topology import UNLIMITED_DELIVERIES

V310, V40, V43 = (3, 10), (4, 0), (4, 3)


def _queue(arg: int | None = None, by_policy: int | None = None, **extra: Any) -> dict[str, Any]:
    """A queue as the management API lists it: its x-delivery-limit argument, and the
    delivery-limit of the policies in force on it."""
    definition = {} if by_policy is None else {"delivery-limit": by_policy}
    return {
        "name": extra.pop("name", "q"),
        "type": extra.pop("type", "quorum"),
        "arguments": {} if arg is None else {"x-delivery-limit": arg},
        "effective_policy_definition": definition,
        **extra,
    }


@pytest.mark.parametrize(
    ("version", "arg", "by_policy", "limit"),
    [
        # 3.x: no limit unless set; a negative one drops at the first return
        (V310, None, None, None),
        (V310, 5, None, 5),
        (V310, None, 7, 7),
        (V310, 5, 7, 5),
        (V310, 9, 7, 7),
        (V310, -1, None, 0),
        # 4.x: 20 unless set; -1 is none; the lower of argument and policy
        (V40, None, None, 20),
        (V43, None, None, 20),
        (V40, UNLIMITED_DELIVERIES, None, UNLIMITED_DELIVERIES),
        (V40, None, UNLIMITED_DELIVERIES, UNLIMITED_DELIVERIES),
        (V40, UNLIMITED_DELIVERIES, 3, 3),
        (V43, 3, UNLIMITED_DELIVERIES, 3),
        (V40, -1, None, None),
        (V43, None, -1, None),
        (V43, -1, 4, 4),
        # unknown version: the safer guess, 4.x's default
        (None, None, None, 20),
    ],
)
def test_the_limit_in_force_follows_each_versions_rules(
    version: tuple[int, int] | None, arg: int | None, by_policy: int | None, limit: int | None
) -> None:
    assert effective_limit(_queue(arg, by_policy), version) == limit


def test_what_43_reports_wins_and_other_queue_types_have_no_limit() -> None:
    assert effective_limit(_queue(None, None, delivery_limit="unlimited"), V43) is None
    assert effective_limit(_queue(None, None, delivery_limit=12), V43) == 12
    assert effective_limit(_queue(None, None, type="classic"), V43) is None
    assert effective_limit(_queue(None, None, type="stream"), V40) is None
    # a bool is not a limit (JSON true)
    assert effective_limit(_queue(True, None), V310) is None


def test_versions_are_read_from_the_management_apis_string() -> None:
    assert parse_version("4.3.6") == (4, 3)
    assert parse_version("3.10.8") == (3, 10)
    assert parse_version("4.0.5+1") == (4, 0)
    assert parse_version(None) is None
    assert parse_version("garbage") is None


def _troubles(queues: list[dict[str, Any]], version: tuple[int, int] | None) -> dict[str, str]:
    found = limit_troubles(
        queues,
        version,
        aside={"ns.parked", "ns.unroutable"},
        aside_prefix="ns.bridge.",
        work_prefix="ns.work.",
        work_limit=20,
    )
    return {t.queue: t.trouble for t in found}


def test_a_namespace_made_by_an_earlier_release_on_4x_is_warned_about() -> None:
    old = [
        _queue(name="ns.parked"),
        _queue(name="ns.unroutable"),
        _queue(name="ns.bridge.orders"),
        _queue(name="ns.work.a"),  # 20 by default: what the settings say
        _queue(name="ns.level.00"),  # levels are never consumed: not our concern
    ]
    troubles = _troubles(old, V40)
    assert set(troubles) == {"ns.parked", "ns.unroutable", "ns.bridge.orders"}
    assert "delivery limit 20 and nowhere to dead-letter to" in troubles["ns.parked"]
    assert "every look at it" in troubles["ns.parked"]
    assert "rmqdelay declare --policies" in troubles["ns.parked"]
    on_43 = _troubles(old, V43)
    assert "every look that ends with a lost channel" in on_43["ns.parked"]


def test_a_namespace_made_by_an_earlier_release_on_310_lacks_only_the_work_limit() -> None:
    old = [_queue(name="ns.parked"), _queue(name="ns.work.a")]
    troubles = _troubles(old, V310)
    assert set(troubles) == {"ns.work.a"}
    assert "no delivery limit" in troubles["ns.work.a"]
    assert "redelivered forever" in troubles["ns.work.a"]


def test_this_releases_queues_and_policies_raise_no_warning() -> None:
    new = [
        _queue(UNLIMITED_DELIVERIES, name="ns.parked"),
        _queue(UNLIMITED_DELIVERIES, name="ns.unroutable"),
        _queue(20, name="ns.work.a"),
        _queue(None, UNLIMITED_DELIVERIES, name="ns.parked", policy="ns.aside-delivery-limit"),
        _queue(None, 20, name="ns.work.b", policy="ns.work-delivery-limit"),
        _queue(None, None, name="ns.parked", type="classic"),
    ]
    for version in (V310, V40, V43):
        assert _troubles(new, version) == {}, version


def test_a_policy_of_someone_elses_that_lowers_the_limit_is_named() -> None:
    held = [_queue(UNLIMITED_DELIVERIES, 5, name="ns.parked", policy="ha-all")]
    [trouble] = _troubles(held, V43).values()
    assert "delivery limit 5" in trouble
    assert "held by policy 'ha-all'" in trouble
    operator = [_queue(20, 3, name="ns.work.a", operator_policy="caps")]
    [trouble] = _troubles(operator, V43).values()
    assert "parked after 3" in trouble
    assert "operator policy 'caps'" in trouble
