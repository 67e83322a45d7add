"""The alerting rules ``rmqdelay alerts`` prints: rendered from code, the shipped copy
current, and what each alert does checked by promtool (tests/alerts/rules_test.yml)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rmqdelay.cli.main import main as cli_main
from rmqdelay.core.alerts import Thresholds, rules, to_yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "examples" / "alerts.yml"


def _promtool() -> str:
    found = os.environ.get("RMQDELAY_PROMTOOL") or shutil.which("promtool")
    cached = Path(os.environ.get("RMQDELAY_TOOLS_DIR", "/var/lib/rmqdelay/tools")) / "promtool"
    if found is None and cached.is_file():
        found = str(cached)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no promtool under CI: scripts/promtool fetches it")
        pytest.skip("no promtool (scripts/promtool fetches Debian's)")
    return found


def test_the_shipped_rules_are_what_rmqdelay_alerts_prints() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == to_yaml(rules("rmqdelay")) + "\n", (
        "examples/alerts.yml is stale: rmqdelay alerts --namespace rmqdelay -o examples/alerts.yml"
    )


def test_promtool_checks_the_rules_and_their_tests_pass() -> None:
    promtool = _promtool()
    for args in (["check", "rules", str(SHIPPED)], ["test", "rules", "rules_test.yml"]):
        done = subprocess.run(
            [promtool, *args], cwd=ROOT / "tests" / "alerts",
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


def test_a_namespace_is_matched_as_the_literal_it_is() -> None:
    exprs = [r["expr"] for r in rules("billing.eu:1", Thresholds())["groups"][0]["rules"]]
    assert "queue='billing.eu:1.parked'" in exprs[0]
    assert "queue=~'billing[.]eu:1[.]work[.].+'" in exprs[4]
    assert all("namespace='billing.eu:1'" in e for e in exprs[2:4])


def test_yaml_strings_are_json_quoted_whatever_they_hold() -> None:
    text = to_yaml({"a": ['he said "x"\\n', 3], "b": {"c": "ü: {x}"}, "d": []})
    assert text == 'a:\n  - "he said \\"x\\"\\\\n"\n  - 3\nb:\n  c: "ü: {x}"\nd: []'
    assert json.loads(text.splitlines()[1][4:]) == 'he said "x"\\n'


def test_the_cli_prints_the_rules_with_the_thresholds_given() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(
            ["alerts", "--namespace", "billing", "--lateness-p99", "10s", "--cancels-behind", "2m"]
        )
    assert code == 0
    assert 'name: "rmqdelay-billing"' in out.getvalue()
    assert '[5m]))) > 10"' in out.getvalue()
    assert "{namespace='billing'}) > 120\"" in out.getvalue()
