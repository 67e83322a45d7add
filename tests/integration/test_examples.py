"""The examples run as a user would run them, against the test broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from rmqdelay import Settings
from rmqdelay.core.topology import destination_topology

from .conftest import ROOT, apply
from .helpers import subprocess_env

pytestmark = pytest.mark.integration


def test_incident_escalation_example_passes(settings: Settings) -> None:
    env = subprocess_env(settings)
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "incident_escalation.py")],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
            check=False,
        )
    finally:
        cleanup = destination_topology(settings.layout, "escalations")
        asyncio.run(apply(settings, cleanup, delete=True))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "escalated [2, 4, 5, 6]" in done.stdout
    assert "skipped 3 cancelled escalations" in done.stdout
