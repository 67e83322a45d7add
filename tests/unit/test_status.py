"""`rmqdelay status` on a cluster: replica warnings and the leader column (pure parts)."""

from __future__ import annotations

from rmqdelay.tools.status import Counts, Level, Status, render, replica_warnings

NODES = ("rabbit@a", "rabbit@b", "rabbit@c")


def test_a_queue_with_every_member_online_or_no_replicas_is_not_warned_about() -> None:
    healthy = Counts("ns.level.00", leader="rabbit@a", members=NODES, online=NODES)
    classic = Counts("ns.level.01")
    assert replica_warnings([healthy, classic]) == []


def test_a_queue_below_its_quorum_is_named_with_the_members_that_are_down() -> None:
    [warning] = replica_warnings(
        [Counts("ns.level.03", leader=None, members=NODES, online=("rabbit@a",))]
    )
    assert "queue ns.level.03: 1 of 3 members online (rabbit@b, rabbit@c down)" in warning
    assert "fewer than a quorum of 2" in warning


def test_a_queue_at_its_quorum_warns_that_one_more_loss_stops_it() -> None:
    [warning] = replica_warnings(
        [Counts("ns.work.a", leader="rabbit@a", members=NODES, online=NODES[:2])]
    )
    assert "2 of 3 members online (rabbit@c down), just a quorum" in warning
    five = tuple(f"rabbit@{n}" for n in "abcde")
    [above] = replica_warnings([Counts("q", members=five, online=five[:4])])
    assert "above a quorum" in above


def test_queues_in_the_same_trouble_share_one_line() -> None:
    down = [Counts(f"ns.level.{k:02d}", members=NODES, online=NODES[:1]) for k in range(6)]
    half = [Counts("ns.parked", members=NODES, online=NODES[:2])]
    first, second = replica_warnings(down + half)
    assert first.startswith(
        "6 queues ns.level.00, ns.level.01, ns.level.02, ns.level.03 and 2 more"
    )
    assert second.startswith("queue ns.parked: 2 of 3")


def test_levels_show_their_leader_and_online_members_when_replicated() -> None:
    status = Status(
        "ns",
        "/",
        "levels",
        "management",
        levels=[
            Level(0, 1024, 0, True, "rabbit@b", NODES, NODES),
            Level(1, 2048, 5, True, "rabbit@c", NODES, NODES[1:]),
            Level(0, 1024, 0, True, "rabbit@c", NODES, NODES, shard=1),
        ],
    )
    lines = [line.split() for line in render(status).splitlines()]
    assert ["level", "ttl", "pending", "leader", "online"] in lines
    assert ["1", "2.048s", "5", "rabbit@c", "2/3"] in lines
    assert ["0.s1", "1.024s", "0", "rabbit@c", "3/3"] in lines
    assert ["leaders:", "rabbit@b", "1,", "rabbit@c", "2"] in lines
    single = Status("ns", "/", "levels", "amqp", levels=[Level(0, 1024, 0, True)])
    assert "leader" not in render(single)  # nothing to show without the management API
