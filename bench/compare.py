"""Side by side in one run: rmqdelay's levels, the delayed-message plugin (when the broker
has it) and a raw baseline, each executing in a worker process of its own.

The same load (``--count`` tasks at ``--rate``, delays uniform in [min, max]) goes through
each pipeline. A worker reports, per task, its lateness: execution start minus due time,
by its own clock. The baseline is what a publisher holding its own timers would get: it
publishes each message to a plain quorum queue at its due time, and a plain consumer acks
it. Then each backend is loaded with ``--pending`` long-delay tasks to measure the broker's
memory per pending task (management API), and its namespace is deleted.

    .venv/bin/python bench/compare.py --rate 1000 --count 6000
    .venv/bin/python bench/compare.py --rate 500,1000,1500,2000 --count 6000 --pending 0

Timings on a shared machine are noisy: compare the rows of one run, not runs. The
broker's CPU is counted from the first publish to the last report; the publisher's and
the consumer's over the same span. For a rate sweep, give each rate a --count of many
times its rate (30,000 at 1,000-2,000/s): the baseline publishes at each task's due time,
so in a short run its publishing trails the offered rate by the span of the delays.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import aio_pika
from lateness import HEADER, Result, paced

from rmqdelay import Scheduler, Settings, Task
from rmqdelay.broker.declare import apply_topology, resolve_backend
from rmqdelay.broker.management import management_get, vhost_path
from rmqdelay.core.redact import split_urls
from rmqdelay.core.topology import build_topology

HERE = Path(__file__).resolve().parent
DESTINATION = "bench"
#: (backend, resolution in ms or None for the default, shards, hold window or None)
Pipeline = tuple[str, int | None, int, str | None]


async def report(task: Task) -> None:
    """The worker's handler (``--handler compare:report``): one line per execution."""
    late_ms = (time.time() - task.due_at.timestamp()) * 1000
    sys.stdout.write(f"{task.id} {late_ms:.3f}\n")
    sys.stdout.flush()


class Reporter:
    """A consumer process that prints one ``<id> <lateness ms>`` line per execution, and
    what it has reported so far."""

    def __init__(self, process: asyncio.subprocess.Process, total: int) -> None:
        assert process.stdout is not None
        self.process, self.total = process, total
        self.lateness: dict[str, float] = {}
        self.seen: Counter[str] = Counter()
        #: Set once every task has been reported.
        self.all_in = asyncio.Event()
        self._reading = asyncio.create_task(self._read(process.stdout))

    @classmethod
    async def worker(cls, env: dict[str, str], total: int) -> Reporter:
        """``rmqdelay consume`` with the ``report`` handler, configured by ``env``."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rmqdelay", "--log-level", "WARNING", "consume", DESTINATION,
            "--handler", "compare:report",
            stdout=asyncio.subprocess.PIPE, cwd=HERE, env={**os.environ, **env},
        )  # fmt: skip
        return cls(process, total)

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.process.wait(), 60)
        self._reading.cancel()

    def result(self, name: str, publish_rate: float, hops: int) -> Result:
        return Result.of(name, publish_rate, self.lateness, self.seen, self.total, hops)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            task_id, _, late = line.decode().partition(" ")
            self.lateness.setdefault(task_id, float(late))
            self.seen[task_id] += 1
            if len(self.seen) >= self.total:
                self.all_in.set()


async def _consumed(url: str, queue: str) -> None:
    """Return once another process consumes ``queue`` (nothing to await across processes)."""
    connection = await aio_pika.connect(split_urls(url)[0])
    async with connection, asyncio.timeout(60):
        channel = await connection.channel()
        while not await _consumer_count(channel, queue):  # noqa: ASYNC110
            await asyncio.sleep(0.2)


async def _consumer_count(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.consumer_count or 0


async def broker_memory(settings: Settings) -> tuple[int, int] | None:
    """(the node's memory, the namespace's queue processes' memory), management API.

    The node's total is what an operator pays, but it drifts with garbage collection by
    more than pending tasks add; the queue processes' memory is steady but leaves out what
    they share (the log and tables). The plugin keeps pending messages in the node's
    database, outside any queue, so for it only the node's total tells.
    """
    nodes = await management_get(settings, "nodes", "mem_used")
    queues = await management_get(settings, f"queues/{vhost_path(settings)}", "name,memory")
    if nodes is None or queues is None:
        return None
    prefix = f"{settings.namespace}."
    return (
        sum(int(n.get("mem_used") or 0) for n in nodes),
        sum(int(q.get("memory") or 0) for q in queues if q["name"].startswith(prefix)),
    )


class Meter:
    """CPU over one pipeline's run, from its first publish until its last task is
    reported: the broker's (declaring and deleting its queues happens once per
    deployment, not once per task, so it is left out: on 4.3 it was about a tenth of a
    6,000-task run), this publishing process's and the consumer's."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.used_s: float | None = None
        #: (publisher, consumer) CPU seconds, when the consumer's could be read.
        self.clients_s: tuple[float, float] | None = None
        self._started: tuple[float | None, float, float | None] = (None, 0.0, None)
        self._consumer = Path("/nonexistent")

    def start(self, consumer_pid: int) -> None:
        self._consumer = Path(f"/proc/{consumer_pid}/stat")
        self._started = (broker_cpu_s(self.pid), time.process_time(), process_cpu_s(self._consumer))

    def stop(self) -> None:
        broker, consumer = broker_cpu_s(self.pid), process_cpu_s(self._consumer)
        if self._started[0] is not None and broker is not None:
            self.used_s = broker - self._started[0]
        if self._started[2] is not None and consumer is not None:
            publisher = time.process_time() - self._started[1]
            self.clients_s = (publisher, consumer - self._started[2])

    def per_task(self, tasks: int) -> float | None:
        return None if self.used_s is None else self.used_s / tasks


async def run_backend(
    url: str, pipeline: Pipeline, delays: list[float], rate: float, pending: int, meter: Meter
) -> tuple[Result, str]:
    backend, resolution_ms, shards, window = pipeline
    settings = Settings(
        _env_file=None,
        url=url,
        namespace=f"bench-{uuid.uuid4().hex[:6]}",
        backend=backend,
        shards=shards,
        **({} if resolution_ms is None else {"resolution_ms": resolution_ms}),
        **({} if window is None else {"hold_window": window}),
    )
    layout_settings = await resolve_backend(settings)
    await apply_topology(layout_settings, build_topology(layout_settings.layout, (DESTINATION,)))
    env = {
        "RMQDELAY_URL": url,
        "RMQDELAY_NAMESPACE": settings.namespace,
        "RMQDELAY_BACKEND": backend,
        "RMQDELAY_RESOLUTION_MS": str(settings.resolution_ms),
        "RMQDELAY_SHARDS": str(shards),
        **({} if window is None else {"RMQDELAY_HOLD_WINDOW": window}),
    }
    reporter = await Reporter.worker(env, len(delays))
    hops = 0
    per_pending = ""
    try:
        await _consumed(url, settings.names.work_queue(DESTINATION))
        async with Scheduler(settings) as scheduler:

            async def publish(i: int) -> None:
                nonlocal hops
                scheduled = await scheduler.schedule(DESTINATION, {"i": i}, delay=delays[i])
                hops += scheduled.hops

            meter.start(reporter.process.pid)
            publish_rate = await paced(len(delays), rate, publish)
            try:
                await asyncio.wait_for(reporter.all_in.wait(), max(delays) + 60)
            except TimeoutError:
                pass
            meter.stop()
            per_pending = await _memory_per_pending(settings, scheduler, pending)
    finally:
        await reporter.stop()
        await apply_topology(
            layout_settings, build_topology(layout_settings.layout, (DESTINATION,)), delete=True
        )
    name = f"rmqdelay {backend} {settings.resolution_ms}ms" if backend == "levels" else backend
    if shards > 1:
        name += f" x{shards} shards"
    if window is not None:
        name += f" window {window}"
    return reporter.result(name, publish_rate, hops), per_pending


async def _memory_per_pending(settings: Settings, scheduler: Scheduler, pending: int) -> str:
    if pending <= 0 or (before := await broker_memory(settings)) is None:
        return "n/a (no management API)"
    batch = [
        scheduler.schedule(DESTINATION, {"pending": i}, delay=timedelta(hours=6))
        for i in range(pending)
    ]
    for start in range(0, pending, 2000):
        await asyncio.gather(*batch[start : start + 2000])
    await asyncio.sleep(12)  # the management API samples memory every few seconds
    after = await broker_memory(settings)
    if after is None:
        return "n/a (no management API)"
    node, queues = ((a - b) / pending for a, b in zip(after, before, strict=True))
    return f"node {node:.0f} B, queue processes {queues:.0f} B"


def process_cpu_s(stat: Path) -> float | None:
    """CPU seconds (user + system) a process has used, from its /proc/<pid>/stat."""
    try:
        after_name = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


def broker_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds used so far by the broker's Erlang VM (None when it cannot be seen):
    what each pipeline costs the broker, per task. ``pid`` names it (``scripts/broker
    pid``); without it, the one beam.smp of this machine, and none when several run (the
    figure would add up other brokers' work)."""
    if pid is not None:
        return process_cpu_s(Path(f"/proc/{pid}/stat"))
    beams = [
        comm.with_name("stat")
        for comm in Path("/proc").glob("[0-9]*/comm")
        if _read(comm) == "beam.smp"
    ]
    return process_cpu_s(beams[0]) if len(beams) == 1 else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


async def broker_version(url: str) -> str:
    """The version the broker announces over AMQP."""
    connection = await aio_pika.connect(split_urls(url)[0])
    async with connection:
        transport = connection.transport
        assert transport is not None
        return str(transport.connection.server_properties.get("version", "?"))


async def run_baseline(url: str, delays: list[float], rate: float, meter: Meter) -> Result:
    """Publisher-held timers: publish at the due time to a plain quorum queue."""
    queue = f"bench-raw-{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(split_urls(url)[0])
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        consumer = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "compare.py"), "--raw-consumer", queue, "--url", url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        reporter = Reporter(consumer, len(delays))
        try:
            await _consumed(url, queue)
            loop = asyncio.get_running_loop()

            async def publish(i: int) -> None:
                due = time.time() + delays[i]
                await asyncio.sleep(delays[i])  # the publisher's own timer
                message = aio_pika.Message(
                    b"{}", headers={"id": str(i), "due_ms": int(due * 1000)},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )  # fmt: skip
                await channel.default_exchange.publish(message, queue)

            started = loop.time()
            meter.start(reporter.process.pid)
            await paced(len(delays), rate, publish)
            # Each publish waits for its due time first: the rate is over the publishing span.
            publish_rate = len(delays) / max(1e-9, loop.time() - started - max(delays))
            try:
                await asyncio.wait_for(reporter.all_in.wait(), 60)
            except TimeoutError:
                pass
            meter.stop()
        finally:
            await reporter.stop()
            await channel.queue_delete(queue)
    return reporter.result("raw: publisher timers", publish_rate, 0)


async def raw_consumer(url: str, queue: str) -> None:
    """The baseline's consumer process: ack each message, report its lateness."""
    connection = await aio_pika.connect(split_urls(url)[0])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=512)
        q = await channel.get_queue(queue, ensure=False)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            headers = message.headers or {}
            late_ms = time.time() * 1000 - int(str(headers["due_ms"]))
            sys.stdout.write(f"{headers['id']!s} {late_ms:.3f}\n")
            sys.stdout.flush()
            await message.ack()

        await q.consume(on_message)
        await stop.wait()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_URL", Settings().url))
    parser.add_argument(
        "--rate", default="1000", help="tasks per second; several (500,1000,2000) for a sweep"
    )
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument(
        "--resolution-ms", default="", help="levels resolution(s), e.g. 256,1024 (default: ours)"
    )
    parser.add_argument("--shards", default="1", help="level sets, e.g. 1,3 (RMQDELAY_SHARDS)")
    parser.add_argument(
        "--hold-window", default="", help="hold window(s), e.g. 1024ms,4s (default: ours)"
    )
    parser.add_argument("--min-delay", type=float, default=0.05, help="seconds")
    parser.add_argument("--max-delay", type=float, default=5.0, help="seconds")
    parser.add_argument("--pending", type=int, default=20000, help="for memory per task; 0: skip")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--broker-pid", type=int, help="the broker's OS pid, for its CPU (scripts/broker pid)"
    )
    parser.add_argument("--raw-consumer", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_consumer:
        await raw_consumer(args.url, args.raw_consumer)
        return 0
    rates = [float(r) for r in str(args.rate).split(",")]
    rng = random.Random(args.seed)
    delays = [rng.uniform(args.min_delay, args.max_delay) for _ in range(args.count)]
    print(
        f"{args.count} tasks per rate, delays {args.min_delay}-{args.max_delay} s, each "
        f"pipeline's worker in its own process; {os.cpu_count()} cores; RabbitMQ "
        f"{await broker_version(args.url)} at {Settings(_env_file=None, url=args.url).safe_url}"
    )
    if broker_cpu_s(args.broker_pid) is None:
        print("broker CPU: n/a (several brokers run here: pass --broker-pid)")
    backends: list[Pipeline] = [
        ("levels", int(ms) if ms else None, int(shards), window or None)
        for ms in str(args.resolution_ms).split(",")
        for shards in str(args.shards).split(",")
        for window in str(args.hold_window).split(",")
    ]
    probe = Settings(_env_file=None, url=args.url, namespace=f"probe-{uuid.uuid4().hex[:6]}")
    if (await resolve_backend(probe.model_copy(update={"backend": "auto"}))).backend == "plugin":
        backends.append(("plugin", None, 1, None))
        await apply_topology(probe, build_topology(probe.layout), delete=True)
    else:
        print("plugin: skipped (the broker has no x-delayed-message exchange type)")
    results: list[tuple[float, Result]] = []
    memory: dict[str, str] = {}
    cpu: dict[tuple[float, str], float | None] = {}
    #: CPU seconds of the publisher and of the consumer (per task when printed).
    clients: dict[tuple[float, str], tuple[float, float] | None] = {}
    for rate in rates:
        for backend in backends:
            pending = args.pending if rate == rates[0] else 0  # memory: measured once
            meter = Meter(args.broker_pid)
            result, per_pending = await run_backend(args.url, backend, delays, rate, pending, meter)
            cpu[rate, result.name] = meter.per_task(len(delays))
            clients[rate, result.name] = meter.clients_s
            results.append((rate, result))
            if pending:
                memory[result.name] = per_pending
        meter = Meter(args.broker_pid)
        results.append((rate, await run_baseline(args.url, delays, rate, meter)))
        cpu[rate, results[-1][1].name] = meter.per_task(len(delays))
        clients[rate, results[-1][1].name] = meter.clients_s
        print(
            f"{'offered':>8} {HEADER} {'broker CPU/task':>16} {'x raw':>6} "
            f"{'publisher':>10} {'consumer':>9}"
        )
        raw = cpu.get((rate, results[-1][1].name))
        for offered, result in results:
            if offered == rate:
                used = cpu.get((offered, result.name))
                shown = f"{used * 1000:.2f} ms" if used is not None else "n/a"
                ratio = f"{used / raw:.2f}" if used is not None and raw else "n/a"
                spent = clients.get((offered, result.name)) or (math.nan, math.nan)
                publisher, consumer = (f"{s * 1000 / len(delays):.2f} ms" for s in spent)
                print(
                    f"{offered:>6.0f}/s {result.row()} {shown:>16} {ratio:>6} "
                    f"{publisher:>10} {consumer:>9}"
                )
    return _summary(results, memory, sweep=len(rates) > 1)


def _summary(results: list[tuple[float, Result]], memory: dict[str, str], *, sweep: bool) -> int:
    """Memory per pending task, the best rate of a sweep, and failures (exit status 1)."""
    for name, per_pending in memory.items():
        print(f"broker memory per pending task, {name}: {per_pending}")
    if sweep:
        for name in dict.fromkeys(r.name for _, r in results):
            kept = [o for o, r in results if r.name == name and _on_time(r)]
            best = f"{max(kept):.0f}/s" if kept else "none of the rates"
            print(f"highest offered rate with p99 <= {ON_TIME_P99_MS} ms, {name}: {best}")
    failed = [r for _, r in results if r.early or r.missing or r.duplicates]
    for r in failed:
        print(f"FAIL {r.name}: {r.early} early, {r.missing} lost, {r.duplicates} duplicates")
    return 1 if failed else 0


#: The bar for "keeps up" in a rate sweep.
ON_TIME_P99_MS = 100


def _on_time(result: Result) -> bool:
    return result.pct(0.99) <= ON_TIME_P99_MS and not (
        result.early or result.missing or result.duplicates
    )


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
