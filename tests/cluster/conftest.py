"""A three-node local cluster (scripts/cluster) for the fault tests, started once a run.

Set RMQDELAY_TEST_CLUSTER=skip to leave these tests out locally, or =running to use a
cluster 'scripts/cluster start' already started (and leave it running). Under CI=true they
must run, so a machine that cannot start the cluster fails the run instead.
"""

from __future__ import annotations

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
    """The running local cluster: node n (1-3) at ``urls[n - 1]``."""

    urls: tuple[str, ...]

    def management(self, first: int = 1) -> str:
        """Every node's management API, node ``first`` first."""
        order = [first, *(n for n in range(1, NODES + 1) if n != first)]
        return ",".join(f"http://localhost:{15680 + n}" for n in order)

    def url_list(self, first: int = 1) -> str:
        """RMQDELAY_URL for the cluster, node ``first`` first (the node clients use)."""
        order = [first, *(n for n in range(1, NODES + 1) if n != first)]
        return ",".join(self.urls[n - 1] for n in order)

    def run(self, *args: str, timeout: float = 240) -> str:
        """``scripts/cluster ARGS``; its stdout."""
        done = subprocess.run(
            [str(ROOT / "scripts" / "cluster"), *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"scripts/cluster {' '.join(args)}: {done.stderr[-800:]}")
        return done.stdout

    def running(self) -> int:
        """How many nodes node 1..3 (whichever answers) sees running."""
        for n in range(1, NODES + 1):
            done = subprocess.run(
                ["rabbitmqctl", "-q", "-n", f"rmqd-c{n}@{_host()}", "eval",
                 "length(rabbit_nodes:all_running())."],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if done.returncode == 0:
                return int(done.stdout.strip())
        return 0


def _host() -> str:
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


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
        yield Cluster(tuple(Cluster(()).run("urls").split()))
        return
    if os.geteuid() != 0:
        _cannot("scripts/cluster runs the nodes as the rabbitmq user: run as root")
    if shutil.which("rabbitmq-server") is None and shutil.which("apt-get") is None:
        _cannot("no rabbitmq-server and no apt-get to install it")
    started = Cluster(())
    urls = tuple(started.run("start", timeout=600).split())
    assert len(urls) == NODES, urls
    try:
        yield Cluster(urls)
    finally:
        started.run("stop")
