"""Definitions rendering: the same topology the clients declare, and the committed file."""

import json
import re
from pathlib import Path

import pytest

from rmqdelay.cli.main import main
from rmqdelay.core.definitions import DefinitionOptions, permission_patterns, render_definitions
from rmqdelay.core.topology import Layout, build_topology
from rmqdelay.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = Layout("ops", "quorum", 10, 6)


def _render_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["definitions", *argv]) == 0
    document: dict[str, object] = json.loads(capsys.readouterr().out)
    return document


def test_every_declared_object_is_rendered_with_the_same_arguments() -> None:
    topology = build_topology(LAYOUT, ("alarms",))
    document = render_definitions(LAYOUT, topology, DefinitionOptions(vhost="ops-vhost"))
    assert [(x["name"], x["type"], x["arguments"]) for x in document["exchanges"]] == [
        (x.name, x.type, x.arguments) for x in topology.exchanges
    ]
    assert [(q["name"], q["arguments"]) for q in document["queues"]] == [
        (q.name, q.creation_arguments) for q in topology.queues
    ]
    assert [
        (b["source"], b["destination"], b["destination_type"], b["routing_key"], b["arguments"])
        for b in document["bindings"]
    ] == [
        (b.source, b.destination, b.destination_type, b.routing_key, b.arguments)
        for b in topology.bindings
    ]
    objects = [*document["exchanges"], *document["queues"], *document["bindings"]]
    assert {o["vhost"] for o in objects} == {"ops-vhost"}
    assert all(o["durable"] and not o["auto_delete"] for o in document["queues"])
    assert document["vhosts"] == [{"name": "ops-vhost"}]
    assert "permissions" not in document
    assert document["policies"] == []
    assert "users" not in document
    assert "password" not in json.dumps(document)


def test_the_committed_definitions_file_is_the_default_rendering(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in __import__("os").environ if k.startswith("RMQDELAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(ROOT / "tests")  # no .env of a developer's
    committed = json.loads((ROOT / "definitions.json").read_text())
    assert _render_cli(capsys) == committed, (
        "definitions.json drifted from the topology code: regenerate it with "
        "'rmqdelay definitions -o definitions.json'"
    )
    settings = Settings(_env_file=None)
    assert len([q for q in committed["queues"] if ".level." in q["name"]]) == settings.levels


def test_options_shape_the_rendering(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "defs.json"
    argv = ["--namespace", "billing", "--vhost", "prod", "--queue-type", "classic"]
    argv += ["--resolution-ms", "100", "--max-delay", "1d", "-o", str(out), "invoices"]
    assert main(["definitions", *argv]) == 0
    assert capsys.readouterr().out == ""
    document = json.loads(out.read_text())
    queues = {q["name"]: q["arguments"] for q in document["queues"]}
    levels = sorted(n for n in queues if n.startswith("billing.level."))
    # 1 day at 100 ms = 864000 units: 20 bits
    assert len(levels) == 20
    assert queues["billing.level.00"]["x-message-ttl"] == 100
    assert queues["billing.level.19"]["x-message-ttl"] == 100 << 19
    assert {a["x-queue-type"] for n, a in queues.items() if a["x-queue-type"] != "stream"} == {
        "classic"
    }
    assert "billing.work.invoices" in queues
    assert {o["vhost"] for o in document["queues"]} == {"prod"}


def test_plugin_rendering_has_the_delayed_exchange_and_no_levels(
    capsys: pytest.CaptureFixture[str],
) -> None:
    document = _render_cli(capsys, "--namespace", "p", "--backend", "plugin")
    delayed = [x for x in document["exchanges"] if x["name"] == "p.delayed"]  # type: ignore[attr-defined]
    assert delayed == [
        {
            "name": "p.delayed",
            "vhost": "/",
            "type": "x-delayed-message",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {"x-delayed-type": "fanout"},
        }
    ]
    assert not [q for q in document["queues"] if ".level." in q["name"]]  # type: ignore[attr-defined]
    assert {"source": "p.delayed", "destination": "p.work"}.items() <= next(
        b
        for b in document["bindings"]
        if b["source"] == "p.delayed"  # type: ignore[attr-defined]
    ).items()


def test_permissions_cover_the_namespace_and_nothing_else(
    capsys: pytest.CaptureFixture[str],
) -> None:
    document = _render_cli(capsys, "--namespace", "a-b.c", "--user", "svc", "x")
    [grant] = document["permissions"]  # type: ignore[misc]
    assert grant["user"] == "svc"
    assert grant["vhost"] == "/"
    names = [o["name"] for o in [*document["exchanges"], *document["queues"]]]  # type: ignore[misc]
    for pattern in (grant["configure"], grant["write"], grant["read"]):
        assert all(re.search(pattern, n) for n in names), pattern
        for other in ("a-b.cx.level.00", "a-bxc.work", "other.work", "amq.direct", "a-b"):
            assert not re.search(pattern, other), (pattern, other)
    # cancel records go through the default exchange
    assert re.search(grant["write"], "amq.default")
    assert not re.search(grant["read"], "amq.default")
    assert grant == {
        "user": "svc",
        "vhost": "/",
        **permission_patterns(Layout("a-b.c", "quorum", 10, 3)),
    }


def test_policies_are_optional_and_limit_deliveries_of_work_queues(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _render_cli(capsys)["policies"] == []
    document = _render_cli(capsys, "--policies", "--delivery-limit", "7", "--vhost", "v")
    work, aside = document["policies"]  # type: ignore[misc]
    assert work["vhost"] == aside["vhost"] == "v"
    assert work["apply-to"] == aside["apply-to"] == "queues"
    assert work["definition"] == {"delivery-limit": 7}
    assert re.search(work["pattern"], "rmqdelay.work.alarms")
    for other in ("rmqdelay.level.01", "rmqdelay.parked", "rmqdelay.bridge.orders"):
        assert not re.search(work["pattern"], other)
    # Nowhere to dead-letter to: no limit may drop a message (not -1, which 3.x rejects).
    assert aside["definition"] == {"delivery-limit": 2**31 - 1}
    for name in ("rmqdelay.parked", "rmqdelay.unroutable", "rmqdelay.bridge.orders"):
        assert re.search(aside["pattern"], name), name
    for other in ("rmqdelay.work.alarms", "rmqdelay.parked.x.work.y", "rmqdelay.level.00"):
        assert not re.search(aside["pattern"], other), other
    # classic queues have no delivery limit: no policy that would do nothing
    assert _render_cli(capsys, "--policies", "--queue-type", "classic")["policies"] == []


def test_new_queues_carry_the_delivery_limits_the_policies_give_older_ones() -> None:
    layout = Layout("ns", "quorum", 10, 3, delivery_limit=9)
    queues = {q.name: q for q in build_topology(layout, ("d",)).queues}
    assert queues["ns.work.d"].creation_arguments["x-delivery-limit"] == 9
    assert queues["ns.parked"].creation_arguments["x-delivery-limit"] == 2**31 - 1
    assert queues["ns.unroutable"].creation_arguments["x-delivery-limit"] == 2**31 - 1
    assert all("x-delivery-limit" not in q.arguments for q in queues.values())
    levels = [q for name, q in queues.items() if ".level." in name]
    assert all("x-delivery-limit" not in q.creation_arguments for q in levels)
    classic = build_topology(Layout("ns", "classic", 10, 3), ("d",))
    assert all("x-delivery-limit" not in q.creation_arguments for q in classic.queues)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-delay", "soon"], "cannot read duration 'soon'"),
        (["--resolution-ms", "0"], "RMQDELAY_RESOLUTION_MS"),
        (["--delivery-limit", "0"], "RMQDELAY_DELIVERY_LIMIT: Input should be greater than or"),
        (["--namespace", "bad name"], "RMQDELAY_NAMESPACE"),
        (["bad\ndestination"], "contains '\\n'"),
        (["café"], "may hold only letters"),
        (["-o", "/nonexistent-dir/defs.json"], "cannot write definitions to"),
    ],
)
def test_bad_options_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["definitions", *argv]) == 1
    assert message in capsys.readouterr().err
