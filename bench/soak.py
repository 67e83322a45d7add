"""Soak: tasks at a steady rate on the local three-node cluster for a long while, with a
worker restarted every few minutes and a cluster node restarted every few more.

Reports what was lost (a ``schedule()`` that returned whose task never ran), what ran early
(started before its stamped due time, on the worker's clock: the workers run here) and what
ran twice, and draws the resident memory of the workers and of each broker node over time
as a PNG, with the restarts marked.

    scripts/cluster start      # RabbitMQ 4.3 unless RMQDELAY_BROKER_VERSION says otherwise
    .venv/bin/python bench/soak.py --minutes 30 --rate 300 --png bench/out/soak.png

Workers are ``rmqdelay consume`` processes (two, so one consumes while the other restarts)
whose handler prints each task it starts; the publisher is this process. Node restarts go
through ``scripts/cluster`` and wait until stopping the node leaves every queue a quorum.
tests/cluster/test_soak.py runs three minutes of it in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the handler below is bench.soak:started

DESTINATION = "soak"
WORKERS = 2
SAMPLE_EVERY_S = 5.0


async def started(task: Any) -> None:
    """The workers' handler: one line per task started (id, stamped due ms, start ms).
    Async, so on the worker's loop: print() from a plain handler's threads writes the line
    and its newline separately, and two threads' lines interleave (3 % of them were lost
    that way in a first run)."""
    due_ms = int(task.due_at.timestamp() * 1000)
    sys.stdout.write(f"ran {task.id} {due_ms} {time.time_ns() // 1_000_000}\n")
    sys.stdout.flush()


@dataclass
class Config:
    urls: list[str]
    managements: list[str]
    minutes: float = 30.0
    rate: float = 300.0
    worker_restart_s: float = 120.0
    node_restart_s: float = 300.0
    #: Delays are drawn from this range, so tasks wait across the restarts.
    delay_s: tuple[float, float] = (0.5, 20.0)
    cluster: str = str(ROOT / "scripts" / "cluster")


@dataclass
class Result:
    returned: dict[str, int] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    runs: Counter[str] = field(default_factory=Counter)
    early_ms: list[int] = field(default_factory=list)
    lateness_ms: list[int] = field(default_factory=list)
    #: (seconds since start, what): restarts of workers and nodes.
    events: list[tuple[float, str]] = field(default_factory=list)
    #: (seconds since start, {series: MB}).
    memory: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0
    #: When the soak began (time.time()), to place the due times of lost tasks.
    began: float = 0.0
    #: Where tasks still waited when the soak gave up on them (queue: messages).
    left_in: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> set[str]:
        return set(self.returned) - set(self.runs)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.runs.values())

    def summary(self) -> dict[str, object]:
        late = sorted(self.lateness_ms) or [0]
        return {
            "seconds": round(self.seconds),
            "returned": len(self.returned),
            "refused": sum(self.refused.values()),
            "refusals": dict(self.refused.most_common(3)),
            "executed": len(self.runs),
            "lost": len(self.lost),
            "early": len(self.early_ms),
            "duplicates": self.duplicates,
            "lateness_p50_ms": late[len(late) // 2],
            "lateness_p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))],
            "worker_restarts": sum(1 for _, e in self.events if e.startswith("worker")),
            "node_restarts": sum(1 for _, e in self.events if e.startswith("node")),
            **self._lost_where(),
        }

    def _lost_where(self) -> dict[str, object]:
        """For lost tasks: when they were due (seconds into the soak), the restarts, and
        the queues still holding messages."""
        if not self.lost:
            return {}
        due_s = sorted(round(self.returned[i] / 1000 - self.began, 1) for i in self.lost)
        return {
            "lost_due_s": [due_s[0], due_s[len(due_s) // 2], due_s[-1]],
            "events": [(round(t, 1), what) for t, what in self.events],
            "left_in": self.left_in,
        }


class Workers:
    """``rmqdelay consume`` processes; each line they print is a task started."""

    def __init__(self, env: dict[str, str], result: Result) -> None:
        self._env = env
        self._result = result
        self.procs: list[asyncio.subprocess.Process | None] = [None] * WORKERS
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, slot: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rmqdelay", "consume", DESTINATION,
            "--handler", "bench.soak:started",
            env=self._env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self.procs[slot] = proc
        self._readers.append(asyncio.create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        result = self._result
        async for line in proc.stdout:
            parts = line.split()
            if len(parts) != 4 or parts[0] != b"ran":
                continue
            task_id, due_ms, start_ms = parts[1].decode(), int(parts[2]), int(parts[3])
            result.runs[task_id] += 1
            if result.runs[task_id] == 1:
                result.lateness_ms.append(start_ms - due_ms)
            if start_ms < due_ms:
                result.early_ms.append(due_ms - start_ms)

    async def restart(self, slot: int) -> None:
        """SIGTERM (a graceful stop: in-flight tasks finish, held ones go back), then a new
        process in its place."""
        proc = self.procs[slot]
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await self.start(slot)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is not None:
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    proc.kill()
        await asyncio.gather(*self._readers, return_exceptions=True)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _cluster(cfg: Config, *args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        cfg.cluster, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 300)


class Soak:
    """One soak run: the load, the restarts and the samples, as ``cfg`` says."""

    def __init__(self, cfg: Config) -> None:
        from rmqdelay import Settings

        self.cfg = cfg
        self.result = Result()
        self.settings = Settings(
            _env_file=None,
            url=",".join(cfg.urls),
            management_url=",".join(cfg.managements),
            namespace=f"soak-{uuid.uuid4().hex[:6]}",
            max_delay=timedelta(hours=1),
            connect_timeout=timedelta(seconds=60),
            publish_deadline=timedelta(seconds=60),
            shutdown_grace=timedelta(seconds=10),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RMQDELAY_")}
        env.update(
            RMQDELAY_URL=self.settings.url,
            RMQDELAY_NAMESPACE=self.settings.namespace,
            RMQDELAY_MAX_DELAY="1h",
            RMQDELAY_CONNECT_TIMEOUT="60s",
            RMQDELAY_PUBLISH_DEADLINE="60s",
            RMQDELAY_SHUTDOWN_GRACE="10s",
            PYTHONPATH=str(ROOT),
        )
        self.workers = Workers(env, self.result)
        self.stop = asyncio.Event()
        self._t0 = time.monotonic()
        self._pending: set[asyncio.Task[None]] = set()
        self._rng = random.Random(24)

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def run(self) -> Result:
        """The whole soak; the counts and samples in the Result."""
        from rmqdelay import Scheduler
        from rmqdelay.broker.declare import apply_topology
        from rmqdelay.broker.management import namespace_depths
        from rmqdelay.core.topology import build_topology

        topology = build_topology(self.settings.layout, (DESTINATION,))
        await apply_topology(self.settings, topology)
        self._t0 = time.monotonic()
        self.result.began = time.time()
        try:
            for slot in range(WORKERS):
                await self.workers.start(slot)
            async with Scheduler(self.settings) as scheduler:
                sampling = asyncio.create_task(self._sample())
                chores = [
                    asyncio.create_task(chore)
                    for chore in (self._load(scheduler), self._workers(), self._nodes())
                ]
                await asyncio.sleep(self.cfg.minutes * 60)
                self.stop.set()
                await asyncio.gather(*chores)
                if self._pending:
                    await asyncio.wait(self._pending, timeout=120)
                await self._drained()
                sampling.cancel()
                if self.result.lost:
                    self.result.left_in = await namespace_depths(self.settings)
        finally:
            self.result.seconds = self.now()
            await self.workers.stop()
            await apply_topology(self.settings, topology, delete=True)
        return self.result

    async def _drained(self) -> None:
        """Until every returned task ran: each is due within the longest delay; a margin
        after that, then what is left is lost."""
        deadline = time.monotonic() + self.cfg.delay_s[1] + 120
        while self.result.lost and time.monotonic() < deadline:  # noqa: ASYNC110 - counts
            await asyncio.sleep(1)

    async def _one(self, scheduler: Any, i: int) -> None:
        from rmqdelay import BrokerUnavailableError, PublishNotConfirmedError

        delay = self._rng.uniform(*self.cfg.delay_s)
        try:
            s = await scheduler.schedule(DESTINATION, {"i": i}, delay=delay)
        except (BrokerUnavailableError, PublishNotConfirmedError) as e:
            self.result.refused[type(e).__name__] += 1  # the caller was told: not a loss
            return
        self.result.returned[s.id] = int(s.due_at.timestamp() * 1000)

    async def _load(self, scheduler: Any) -> None:
        i = 0
        while not self.stop.is_set():
            # Paced by the clock, not by confirms: a stalled publish must not lower the rate.
            for _ in range(int(self.now() * self.cfg.rate) - i):
                task = asyncio.create_task(self._one(scheduler, i))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                i += 1
            await asyncio.sleep(0.01)

    async def _workers(self) -> None:
        slot = 0
        while not await self._stopped_within(self.cfg.worker_restart_s):
            self.result.events.append((self.now(), f"worker {slot + 1} restarted"))
            await self.workers.restart(slot)
            slot = (slot + 1) % WORKERS

    async def _nodes(self) -> None:
        node = 1
        while not await self._stopped_within(self.cfg.node_restart_s):
            # A member may still be catching up: wait, as production should.
            while await _cluster(self.cfg, "safe-to-stop", str(node)) != 0:  # noqa: ASYNC110
                await asyncio.sleep(2)
            self.result.events.append((self.now(), f"node {node} restarted"))
            await _cluster(self.cfg, "stop", str(node))
            await _cluster(self.cfg, "restart", str(node))
            node = node % 3 + 1

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True at once if the soak ends meanwhile."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _sample(self) -> None:
        async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as http:
            while True:
                point: dict[str, float] = {}
                for slot, proc in enumerate(self.workers.procs):
                    if proc is not None and (mb := _rss_mb(proc.pid)) is not None:
                        point[f"worker {slot + 1}"] = mb
                if (mb := _rss_mb(os.getpid())) is not None:
                    point["publisher (this process: it keeps every id)"] = mb
                point.update(await _node_memory(http, self.cfg.managements))
                self.result.memory.append((self.now(), point))
                await asyncio.sleep(SAMPLE_EVERY_S)


async def _node_memory(http: httpx.AsyncClient, managements: list[str]) -> dict[str, float]:
    """Each node's mem_used in MB, from the first management API that answers."""
    for url in managements:
        try:
            reply = await http.get(f"{url}/api/nodes", params={"columns": "name,running,mem_used"})
            # A node that is down reports no memory (or 0): left out, a gap in its line.
            return {
                n["name"].split("@")[0]: n["mem_used"] / 1e6
                for n in reply.json()
                if n.get("running", True) and n.get("mem_used")
            }
        except (httpx.HTTPError, ValueError):
            continue  # that node is restarting: ask the next
    return {}


def draw(result: Result, png: Path, title: str) -> None:
    """Memory over time, one line a series, restarts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({name for _, point in result.memory for name in point})
    fig, (workers_ax, broker_ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name in series:
        xs = [t / 60 for t, p in result.memory if name in p]
        ys = [p[name] for _, p in result.memory if name in p]
        ax = broker_ax if name.startswith("rmqd") or name.startswith("rabbit") else workers_ax
        ax.plot(xs, ys, label=name, linewidth=1.2)
    for t, what in result.events:
        ax = workers_ax if what.startswith("worker") else broker_ax
        ax.axvline(t / 60, color="grey", linewidth=0.6, linestyle=":")
    workers_ax.set_ylabel("RSS, MB (restarts dotted)")
    workers_ax.set_title("rmqdelay processes")
    broker_ax.set_ylabel("mem_used, MB (restarts dotted)")
    broker_ax.set_title("RabbitMQ nodes")
    broker_ax.set_xlabel("minutes")
    for ax in (workers_ax, broker_ax):
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    s = result.summary()
    fig.suptitle(
        f"{title}: {s['returned']} returned, {s['lost']} lost, {s['early']} early, "
        f"{s['duplicates']} twice, {s['refused']} refused",
        fontsize=11,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--worker-restart", type=float, default=120, help="seconds")
    parser.add_argument("--node-restart", type=float, default=300, help="seconds")
    parser.add_argument("--png", type=Path, default=ROOT / "bench" / "out" / "soak.png")
    args = parser.parse_args()
    cluster = str(ROOT / "scripts" / "cluster")
    urls = subprocess.run([cluster, "urls"], capture_output=True, text=True, check=True)
    managements = subprocess.run(
        [cluster, "management"], capture_output=True, text=True, check=True
    )
    cfg = Config(
        urls=urls.stdout.split(),
        managements=managements.stdout.strip().split(","),
        minutes=args.minutes,
        rate=args.rate,
        worker_restart_s=args.worker_restart,
        node_restart_s=args.node_restart,
    )
    result = asyncio.run(Soak(cfg).run())
    version = os.environ.get("RMQDELAY_BROKER_VERSION", "4.3")
    draw(result, args.png, f"soak, RabbitMQ {version}, {args.minutes:g} min at {args.rate:g}/s")
    print(json.dumps(result.summary(), indent=2))
    print(f"memory plot: {args.png}")


if __name__ == "__main__":
    main()
