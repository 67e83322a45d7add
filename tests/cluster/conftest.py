"""A three-node local cluster (scripts/cluster) for the fault tests, started once a run.

The cluster is of the version RMQDELAY_BROKER_VERSION names (4.3 by default), on ports of
its own; the tests reach its nodes only through the URLs scripts/cluster prints and act on
them only through scripts/cluster. Set RMQDELAY_TEST_CLUSTER=skip to leave these tests out
locally, or =running to use a cluster 'scripts/cluster start' already started (and leave it
running). Under CI=true they must run, so a machine that cannot start the cluster fails the
run instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.cluster

NODES = 3


@dataclass(frozen=True)
class Cluster:
    """The running local cluster: node n (1-3) at ``urls[n - 1]``, its management API at
    ``managements[n - 1]``."""

    urls: tuple[str, ...] = ()
    managements: tuple[str, ...] = ()

    def management(self, first: int = 1) -> str:
        """Every node's management API, node ``first`` first."""
        return ",".join(self.managements[n - 1] for n in _order(first))

    def url_list(self, first: int = 1) -> str:
        """RMQDELAY_URL for the cluster, node ``first`` first (the node clients use)."""
        return ",".join(self.urls[n - 1] for n in _order(first))

    def run(self, *args: str, timeout: float = 240) -> str:
        """``scripts/cluster ARGS``; its stdout."""
        done = subprocess.run(
            [str(ROOT / "scripts" / "cluster"), *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"scripts/cluster {' '.join(args)}: {done.stderr[-800:]}")
        return done.stdout

    async def safe_to_stop(self, n: int) -> bool:
        """Whether stopping node ``n`` leaves every quorum queue a quorum."""
        done = await asyncio.create_subprocess_exec(
            str(ROOT / "scripts" / "cluster"), "safe-to-stop", str(n),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return await asyncio.wait_for(done.wait(), 60) == 0

    def running(self) -> int:
        """How many nodes the cluster sees running."""
        return int(self.run("running").strip())

    @classmethod
    def started(cls, urls: str) -> Cluster:
        """The cluster whose ``scripts/cluster start`` (or ``urls``) printed ``urls``."""
        return cls(tuple(urls.split()), tuple(cls().run("management").strip().split(",")))


def _order(first: int) -> list[int]:
    return [first, *(n for n in range(1, NODES + 1) if n != first)]


def _cannot(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cluster tests cannot run under CI: {reason}")
    pytest.skip(f"cluster tests: {reason}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    mode = os.environ.get("RMQDELAY_TEST_CLUSTER", "").lower()
    if mode == "skip":
        pytest.skip("RMQDELAY_TEST_CLUSTER=skip")
    if mode == "running":
        yield Cluster.started(Cluster().run("urls"))
        return
    if os.geteuid() != 0:
        _cannot("scripts/cluster runs the nodes as the rabbitmq user: run as root")
    if shutil.which("debootstrap") is None and shutil.which("apt-get") is None:
        _cannot("no debootstrap, and no apt-get to install it")
    cluster = Cluster.started(Cluster().run("start", timeout=900))
    assert len(cluster.urls) == NODES, cluster.urls
    try:
        yield cluster
    finally:
        cluster.run("stop")
