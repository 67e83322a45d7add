"""The soak's short version (bench/soak.py runs it for 30 minutes): three minutes at 300
tasks/s on the cluster, a worker restarted every 40 s and a node every 75 s. Nothing lost,
nothing early, duplicates rare; the memory plot is drawn to tests/output/soak.png."""

from __future__ import annotations

import pytest

from bench.soak import Config, Soak, draw
from tests.integration.conftest import ROOT

from .conftest import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.soak]


@pytest.mark.timeout(600)
async def test_three_minutes_with_worker_and_node_restarts_lose_nothing(cluster: Cluster) -> None:
    cfg = Config(
        urls=list(cluster.urls),
        managements=list(cluster.managements),
        minutes=3,
        rate=300,
        worker_restart_s=40,
        node_restart_s=75,
    )
    result = await Soak(cfg).run()
    summary = result.summary()
    draw(result, ROOT / "tests" / "output" / "soak.png", "soak (CI), 3 min at 300/s")
    print(f"\nsoak: {summary}")
    assert summary["worker_restarts"] >= 4
    assert summary["node_restarts"] >= 2
    assert summary["returned"] >= 0.9 * 3 * 60 * 300, summary
    assert not result.lost, f"{len(result.lost)} returned tasks never ran: {summary}"
    assert not result.early_ms, f"started before their due time: {sorted(result.early_ms)[-5:]}"
    assert result.duplicates <= len(result.returned) // 100, summary
