"""Topology shape, and a walk of every hop plan through it as a broker would route it."""

from collections.abc import Mapping

import pytest

from rmqdelay.core.delays import hop_plan, level_ttl_ms
from rmqdelay.core.names import Names
from rmqdelay.core.topology import Layout, Topology, build_topology
from rmqdelay.core.wire import ROUTE_IN, route_headers
from rmqdelay.settings import Settings

LAYOUT = Layout("t", "quorum", 10, 12)
TOPOLOGY = build_topology(LAYOUT, ("alarms",))


def _matches(binding_args: Mapping[str, object], headers: Mapping[str, object]) -> bool:
    wanted = {k: v for k, v in binding_args.items() if k != "x-match"}
    assert binding_args.get("x-match") == "all"
    return all(headers.get(k) == v for k, v in wanted.items())


def walk(
    topology: Topology,
    headers: Mapping[str, object],
    routing_key: str,
    start: str | None = None,
    visited: list[str] | None = None,
    journaled: list[str] | None = None,
) -> tuple[str, int]:
    """Route like RabbitMQ: headers/fanout/direct exchanges, alternate exchanges, TTL + DLX.

    Returns the queue the message ends in and the total TTL it spent in levels (appending
    each level it waited in to ``visited``, and each exchange that copied it into the
    journal to ``journaled``).
    """
    names = Names(topology.queues[0].name.split(".")[0])
    journal = names.journal
    # The aside queues' logs take a copy of what reaches the queue beside them.
    logs = {names.aside_log(names.parked), names.aside_log(names.unroutable)}
    exchanges = {x.name: x for x in topology.exchanges}
    queues = {q.name: q for q in topology.queues}
    exchange, waited = start or topology.exchanges[3].name, 0  # the schedule exchange
    for _ in range(200):
        x = exchanges[exchange]
        out = [b for b in topology.bindings if b.source == exchange]
        if x.type == "headers":
            out = [b for b in out if _matches(b.arguments, headers)]
        elif x.type == "direct":
            out = [b for b in out if b.routing_key == routing_key]
        copies = [b for b in out if b.destination == journal]
        if journaled is not None:
            journaled.extend(b.source for b in copies)
        out = [b for b in out if b.destination != journal and b.destination not in logs]
        if not out:
            assert "alternate-exchange" in x.arguments, f"{exchange} drops unmatched messages"
            exchange = str(x.arguments["alternate-exchange"])
            continue
        assert len(out) == 1, f"{exchange} routes one message to {len(out)} places"
        binding = out[0]
        if binding.destination_type == "exchange":
            exchange = binding.destination
            continue
        queue = queues[binding.destination]
        if "x-message-ttl" not in queue.arguments:
            return queue.name, waited
        waited += int(queue.arguments["x-message-ttl"])
        if visited is not None:
            visited.append(queue.name)
        exchange = str(queue.arguments["x-dead-letter-exchange"])
    raise AssertionError("routing loop")


@pytest.mark.parametrize("units", range(2**LAYOUT.levels))
def test_every_plan_reaches_the_work_queue_after_exactly_its_units(units: int) -> None:
    queue, waited = walk(TOPOLOGY, route_headers(hop_plan(units)), "alarms")
    assert queue == "t.work.alarms"
    assert waited == units * LAYOUT.resolution_ms


@pytest.mark.parametrize("units", [0, 1, 5, 2**LAYOUT.levels - 1])
def test_every_task_is_copied_into_the_journal_once_on_its_way_in(units: int) -> None:
    journaled: list[str] = []
    walk(TOPOLOGY, route_headers(hop_plan(units)), "alarms", journaled=journaled)
    assert journaled == ["t.schedule"]


def test_without_the_journal_nothing_is_copied_and_no_stream_is_bound() -> None:
    topology = build_topology(Layout("t", "quorum", 10, 12, journal=False), ("alarms",))
    journaled: list[str] = []
    walk(topology, route_headers(hop_plan(5)), "alarms", journaled=journaled)
    assert journaled == []
    assert not [b for b in topology.bindings if b.destination == "t.journal"]


def test_a_malformed_first_stop_is_not_journaled_and_routes_nowhere() -> None:
    """The schedule exchange has no alternate, so the publisher gets the message back
    (mandatory): a journal binding matching everything would swallow it instead."""
    for stop in ("12", "x", ""):
        headers = {ROUTE_IN: stop}
        matched = [
            b
            for b in TOPOLOGY.bindings
            if b.source == "t.schedule" and _matches(b.arguments, headers)
        ]
        assert matched == []


def test_malformed_plans_end_in_the_unroutable_queue_not_a_level() -> None:
    topology = build_topology(LAYOUT, ("alarms",))
    bogus = {**route_headers(hop_plan(0b1010)), "rmqdelay-route-3": "7"}  # upward: no binding
    assert walk(topology, bogus, "alarms")[0] == "t.unroutable"
    assert walk(topology, route_headers(hop_plan(5)), "no-such-destination")[0] == "t.unroutable"
    assert (
        walk(topology, {**route_headers(hop_plan(4)), "rmqdelay-route-2": "x"}, "alarms")[0]
        == "t.unroutable"
    )


def test_schedule_exchange_has_no_alternate_so_publishers_get_returns() -> None:
    topology = build_topology(LAYOUT)
    schedule = next(x for x in topology.exchanges if x.name == "t.schedule")
    assert schedule.arguments == {}
    assert not any(
        _matches(b.arguments, {ROUTE_IN: "99"})
        for b in topology.bindings
        if b.source == "t.schedule"
    )


def test_quorum_levels_dead_letter_at_least_once_with_reject_publish() -> None:
    topology = build_topology(LAYOUT)
    levels = [q for q in topology.queues if ".level." in q.name]
    assert len(levels) == LAYOUT.levels
    for k, q in enumerate(levels):
        assert q.name == Names("t").level_queue(k)
        assert q.arguments == {
            "x-queue-type": "quorum",
            "x-message-ttl": level_ttl_ms(k, 10),
            "x-dead-letter-exchange": f"t.after.{k:02d}",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


def test_classic_levels_have_no_quorum_only_arguments() -> None:
    topology = build_topology(Layout("t", "classic", 10, 3))
    for q in topology.queues:
        if q.arguments["x-queue-type"] == "stream":  # cancels, snapshots, series
            continue
        assert q.arguments["x-queue-type"] == "classic"
        assert "x-dead-letter-strategy" not in q.arguments
        assert "x-overflow" not in q.arguments


def test_every_dead_letter_target_and_the_work_exchange_route_somewhere() -> None:
    topology = build_topology(LAYOUT, ("a", "b"))
    exchanges = {x.name: x for x in topology.exchanges}
    targets = {
        q.arguments["x-dead-letter-exchange"]
        for q in topology.queues
        if "x-dead-letter-exchange" in q.arguments
    }
    for name in targets | {"t.work"}:
        x = exchanges[str(name)]
        assert x.type == "fanout" or x.arguments.get("alternate-exchange") == "t.unroutable"
    assert exchanges["t.unroutable"].type == "fanout"


def test_binding_counts() -> None:
    topology = build_topology(LAYOUT, ("a",))
    by_source: dict[str, int] = {}
    for b in topology.bindings:
        by_source[b.source] = by_source.get(b.source, 0) + 1
    assert by_source["t.schedule"] == 2 * (LAYOUT.levels + 1)  # to each stop, and journal
    for k in range(LAYOUT.levels):
        assert by_source[f"t.after.{k:02d}"] == k + 1
    assert by_source["t.work"] == 1


def test_default_settings_make_29_levels_of_1024ms_up_to_ten_years() -> None:
    layout = Settings(_env_file=None).layout
    assert (layout.resolution_ms, layout.levels) == (1024, 29)
    topology = build_topology(layout)
    top = max(int(q.arguments.get("x-message-ttl", 0)) for q in topology.queues)
    assert top == 1024 * 2**28 <= 315_360_000_000
    queue, waited = walk(topology, route_headers(hop_plan(2**29 - 1)), "x")
    assert queue == "rmqdelay.unroutable"  # no work queue "x" declared: caught, not dropped
    assert waited == (2**29 - 1) * 1024


def test_cancels_live_in_a_stream_that_keeps_them_for_the_retention() -> None:
    topology = build_topology(Layout("t", "classic", 10, 3, cancel_retention_s=86400))
    stream = next(q for q in topology.queues if q.name == "t.cancels")
    assert stream.arguments == {"x-queue-type": "stream", "x-max-age": "86400s"}
    snapshots = next(q for q in topology.queues if q.name == "t.cancels.snapshots")
    assert snapshots.arguments == {"x-queue-type": "stream", "x-max-age": "172800s"}


SHARDED = Layout("t", "quorum", 10, 8, shards=3)


@pytest.mark.parametrize("shard", range(3))
@pytest.mark.parametrize("units", [1, 2, 3, 100, 2**8 - 1])
def test_each_shard_is_a_whole_level_set_that_keeps_its_tasks(shard: int, units: int) -> None:
    topology = build_topology(SHARDED, ("alarms",))
    visited: list[str] = []
    start = SHARDED.names.schedule_exchange_of(shard)
    queue, waited = walk(topology, route_headers(hop_plan(units)), "alarms", start, visited)
    assert (queue, waited) == ("t.work.alarms", units * SHARDED.resolution_ms)
    assert visited
    assert all(SHARDED.names.level_queue(int(q.split(".")[2]), shard) == q for q in visited)


def test_shard_zero_keeps_the_names_of_an_unsharded_deployment() -> None:
    one = build_topology(LAYOUT)
    three = build_topology(Layout("t", "quorum", 10, 12, shards=3))
    assert {q.name for q in one.queues} < {q.name for q in three.queues}
    assert {x.name for x in one.exchanges} < {x.name for x in three.exchanges}
    assert len(three.queues) - len(one.queues) == 2 * LAYOUT.levels
    assert Names("t").level_queue(3, 2) == "t.level.03.s2"
    assert Names("t").schedule_exchange_of(0) == "t.schedule"


def test_levels_are_declared_level_by_level_across_shards() -> None:
    # With balanced leader placement, declaring in this order puts level k of each shard
    # on a different node (the busy low levels above all).
    names = [q.name for q in build_topology(SHARDED).queues if ".level." in q.name]
    assert names[:4] == ["t.level.00", "t.level.00.s1", "t.level.00.s2", "t.level.01"]


def test_replicated_queues_carry_placement_that_only_applies_at_creation() -> None:
    queues = {q.name: q for q in build_topology(LAYOUT, ("alarms",)).queues}
    quorum = {"x-queue-leader-locator": "balanced", "x-quorum-initial-group-size": 3}
    for name in ("t.level.00", "t.work.alarms", "t.parked", "t.unroutable"):
        assert queues[name].placement == quorum
        assert not set(quorum) & set(queues[name].arguments), "not part of the identity"
    stream = {"x-queue-leader-locator": "balanced", "x-initial-cluster-size": 3}
    assert queues["t.cancels"].placement == stream
    classic = build_topology(Layout("t", "classic", 10, 12), ("alarms",))
    assert all(q.placement == {} for q in classic.queues if q.arguments["x-queue-type"] != "stream")
    unset = build_topology(Layout("t", "quorum", 10, 12, replicas=None))
    assert all(set(q.placement) == {"x-queue-leader-locator"} for q in unset.queues)


@pytest.mark.parametrize("backend", ["levels", "plugin"])
def test_what_reaches_a_queue_set_aside_is_copied_to_its_log(backend: str) -> None:
    layout = Settings(_env_file=None, namespace="t", backend=backend).layout
    topology, names = build_topology(layout, ("d",)), layout.names
    streams = {q.name: q.arguments for q in topology.queues}
    for aside in (names.parked, names.unroutable):
        out = {b.destination for b in topology.bindings if b.source == aside}
        assert out == {aside, names.aside_log(aside)}
        assert streams[names.aside_log(aside)]["x-queue-type"] == "stream"
        assert "x-max-age" in streams[names.aside_log(aside)]
