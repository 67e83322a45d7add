"""Routes: the levels' hop plans or the plugin's x-delay, and what each refuses."""

import zlib
from collections import Counter
from datetime import timedelta

import pytest

from rmqdelay.broker.scheduler import new_task_id
from rmqdelay.core.delays import DelayLimits, hop_plan
from rmqdelay.core.errors import InvalidDelayError
from rmqdelay.core.names import Names
from rmqdelay.core.routes import PLUGIN_MAX_DELAY_MS, X_DELAY, route, shard_of
from rmqdelay.core.topology import Layout, build_topology
from rmqdelay.core.wire import ROUTE_IN, route_headers
from rmqdelay.settings import Settings

NAMES = Names("n")
LIMITS = DelayLimits(10, 35, 3653 * 86_400_000_000)


@pytest.mark.parametrize("wait_us", [0, 1, 9_999, 10_000, 10_001, 1_234_567_890])
def test_levels_route_is_the_hop_plan_to_the_schedule_exchange(wait_us: int) -> None:
    r = route("levels", NAMES, LIMITS, wait_us)
    plan = hop_plan(wait_us // 10_000)  # whole units: at most one unit early, then held
    # With no level to visit, straight into the work exchange (its key is the destination).
    assert r.exchange == ("n.schedule" if plan else "n.work")
    assert r.mandatory
    assert r.headers == route_headers(plan)
    assert r.hops == len(plan)


@pytest.mark.parametrize(
    ("wait_us", "ms"),
    [(-5, 0), (0, 0), (1, 1), (999, 1), (1000, 1), (1001, 2), (86_400_000_000, 86_400_000)],
)
def test_plugin_route_is_x_delay_in_whole_milliseconds_rounded_up(wait_us: int, ms: int) -> None:
    r = route("plugin", NAMES, LIMITS, wait_us)
    assert r.exchange == "n.delayed"
    assert r.headers == {X_DELAY: ms}
    # the plugin returns every delayed publish as unroutable at once: no mandatory
    assert r.mandatory is False
    assert ROUTE_IN not in r.headers


def test_plugin_takes_its_longest_delay_and_refuses_one_ms_more() -> None:
    assert route("plugin", NAMES, LIMITS, PLUGIN_MAX_DELAY_MS * 1000).headers == {
        X_DELAY: PLUGIN_MAX_DELAY_MS
    }
    with pytest.raises(InvalidDelayError, match="delayed-message plugin can hold") as info:
        route("plugin", NAMES, LIMITS, PLUGIN_MAX_DELAY_MS * 1000 + 1)
    assert "RMQDELAY_BACKEND=levels" in str(info.value)


@pytest.mark.parametrize("backend", ["levels", "plugin"])
def test_both_backends_keep_the_configured_maximum(backend: str) -> None:
    limits = DelayLimits(10, 20, 3_600_000_000)
    with pytest.raises(InvalidDelayError, match="RMQDELAY_MAX_DELAY"):
        route(backend, NAMES, limits, 3_600_000_001)  # type: ignore[arg-type]


def test_plugin_topology_feeds_the_work_exchange_and_has_no_levels() -> None:
    topology = build_topology(Layout("n", "quorum", 10, 35, backend="plugin"), ("d",))
    exchanges = {x.name: x for x in topology.exchanges}
    assert exchanges["n.delayed"].type == "x-delayed-message"
    assert exchanges["n.delayed"].arguments == {"x-delayed-type": "fanout"}
    assert exchanges["n.work"].arguments == {"alternate-exchange": "n.unroutable"}
    assert not [q for q in topology.queues if ".level." in q.name]
    assert "n.schedule" not in exchanges
    [feed] = [b for b in topology.bindings if b.source == "n.delayed"]
    assert (feed.destination, feed.destination_type) == ("n.work", "exchange")
    assert {q.name for q in topology.queues} == {
        "n.unroutable", "n.parked", "n.cancels", "n.cancels.snapshots", "n.series", "n.stats",
        "n.unroutable.log", "n.parked.log", "n.work.d",
    }  # fmt: skip


def test_the_wiring_routes_by_the_backend() -> None:
    plugin = Settings(_env_file=None, namespace="s", backend="plugin").wiring
    assert plugin.backend == "plugin"
    assert plugin.route(1000).exchange == "s.delayed"
    # auto stands for the levels until a client has asked the broker
    auto = Settings(_env_file=None, namespace="s", backend="auto").wiring
    assert auto.backend == "levels"
    # (20 s: beyond the default hold window, so through the levels)
    assert auto.route(timedelta(seconds=20) // timedelta(microseconds=1)).exchange == "s.schedule"


def test_with_journal_soon_a_task_due_within_the_window_takes_the_schedule_exchange() -> None:
    soon = 5_000_000  # 5 s: within the default 16 s hold window
    plain = Settings(_env_file=None, namespace="j").wiring.route(soon)
    assert (plain.exchange, plain.hops) == ("j.work", 0)
    journaled = Settings(_env_file=None, namespace="j", journal_soon=True).wiring.route(soon)
    # Through the schedule exchange straight to work: the journal's binding copies it.
    assert (journaled.exchange, journaled.hops) == ("j.schedule", 0)
    assert journaled.headers == {ROUTE_IN: "work"}
    # Without a journal there is nothing to copy it into: straight to work as before.
    off = Settings(_env_file=None, namespace="j", journal_soon=True, journal=False).wiring
    assert off.route(soon).exchange == "j.work"


def test_the_wiring_is_derived_once_per_layout_and_routes_are_shared() -> None:
    settings = Settings(_env_file=None, namespace="w")
    assert settings.wiring is settings.wiring
    assert settings.wiring is not Settings(_env_file=None, namespace="other").wiring
    first, again = settings.wiring.route(5_000_000), settings.wiring.route(5_100_000)
    assert first is again, "same whole units, same cached route"
    with pytest.raises(TypeError):
        first.headers["rmqdelay-route-in"] = "0"  # type: ignore[index]  # shared: read-only


def test_tasks_spread_evenly_over_shards_by_a_crc32_of_their_id() -> None:
    assert shard_of("anything", 1) == 0
    assert shard_of("order-42", 5) == zlib.crc32(b"order-42") % 5
    counts = Counter(shard_of(new_task_id(), 4) for _ in range(40_000))
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) / min(counts.values()) < 1.1


def test_the_wiring_routes_a_task_through_the_levels_of_its_shard() -> None:
    settings = Settings(_env_file=None, namespace="t", shards=3)
    wiring = settings.wiring
    for task_id in ("a", "b", "c", "d"):
        way = wiring.route(50_000_000, task_id)
        assert way.exchange == Names("t").schedule_exchange_of(shard_of(task_id, 3))
