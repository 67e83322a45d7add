"""Dashboard pages with many tasks pending and many parked: how long each page takes to
answer through ``rmqdelay serve``, side by side with the same pages of an empty namespace.

Fills one namespace with ``--pending`` tasks over four destinations (due over the next
week, one key each; classic level queues, which schedule several times faster than
quorum ones and change nothing of what the pages read) and ``--parked`` tasks parked by a
worker whose handler fails, then times every page (median of ``--rounds`` requests) in
it and in an empty namespace, both served at once.

    .venv/bin/python bench/dashboard.py --url amqp://guest:guest@localhost:5730/%2F \\
        --pending 1000000 --parked 10000

Filling a million takes about half an hour here: ``--namespace NS --keep`` leaves the
filled namespace in place, and ``--namespace NS --filled`` times it again (after a code
change, say) without filling it anew. Delete it with ``rmqdelay destroy``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
import uuid
from datetime import timedelta

import httpx
import uvicorn
from pydantic import SecretStr

from rmqdelay import RetryPolicy, Scheduler, Settings, Task, TaskSpec, Worker
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology
from rmqdelay.tools.aside_log import AsideLog
from rmqdelay.tools.parking import ParkingLot
from rmqdelay.web.api import server_config

DESTINATIONS = ("escalations", "reminders", "invoices", "webhooks")
BATCH = 1000
TOKEN = "bench-token"
BUDGET_S = 1.0


def settings_for(url: str, management: str | None, namespace: str | None = None) -> Settings:
    return Settings(
        _env_file=None,
        url=url,
        namespace=namespace or f"db-{uuid.uuid4().hex[:6]}",
        queue_type="classic",
        max_delay=timedelta(days=30),
        http_token=SecretStr(TOKEN),
        **({"management_url": management} if management else {}),
    )


async def fill(settings: Settings, pending: int, parked: int) -> tuple[str, str]:
    """Schedule and park; returns a pending task's id and a parked one's (the last)."""
    started = time.perf_counter()
    async with Scheduler(settings) as scheduler:
        first = ""
        for start in range(0, pending, BATCH):
            done = await scheduler.schedule_many(
                [
                    TaskSpec(
                        DESTINATIONS[i % len(DESTINATIONS)],
                        {"n": i},
                        delay=60 + i % (7 * 86400),
                        keys=[f"order:{i}"],
                    )
                    for i in range(start, min(pending, start + BATCH))
                ]
            )
            first = done[-1].id  # the latest due (days from now): still pending when timed
            if start % 100_000 == 0:
                print(f"  scheduled {start} ({time.perf_counter() - started:.0f} s)", flush=True)

        async def broken(task: Task) -> None:
            raise LookupError(f"no account {task.payload['n']}")

        worker = Worker(
            settings,
            "failing",
            broken,
            retry=RetryPolicy(max_attempts=1, base_ms=1, cap_ms=1),
            concurrency=64,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        last = ""
        for start in range(0, parked, BATCH):
            done = await scheduler.schedule_many(
                [
                    TaskSpec("failing", {"n": i}, delay=0)
                    for i in range(start, min(parked, start + BATCH))
                ]
            )
            last = done[-1].id
        async with asyncio.timeout(600):
            await worker.wait_for(lambda s: s.parked >= parked)
        stop.set()
        await running
    print(f"filled in {time.perf_counter() - started:.0f} s", flush=True)
    return first, last


async def filled_ids(settings: Settings, pending: int, parked: int) -> tuple[str, str]:
    """The ids ``fill`` returned, from a namespace an earlier run filled: the task of the
    last key scheduled (due days later), and the newest parked."""
    async with Scheduler(settings) as scheduler:
        async with asyncio.timeout(900):  # the scheduler reads the whole journal first
            found = await scheduler.find(key=f"order:{pending - 1}")
        newest = (await ParkingLot(scheduler).peek(parked))[-1]
    return found.tasks[0].id, newest.id


async def time_show(settings: Settings, task_id: str, rounds: int) -> tuple[float, float]:
    """The newest parked message shown by taking the lot and from its log (read once
    before, as serve does at start): medians of ``rounds``, side by side."""
    async with Scheduler(settings) as scheduler:
        names = scheduler.wiring.names
        log = AsideLog(names.aside_log(names.parked))
        assert await log.catch_up(scheduler.connection)
        timed: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for logged in (False, True):
                lot = ParkingLot(scheduler, log if logged else None)
                started = time.perf_counter()
                shown = await lot.show(task_id)
                timed[logged].append(time.perf_counter() - started)
                assert shown is not None
                assert shown.logged == logged
    return statistics.median(timed[False]), statistics.median(timed[True])


class Serve:
    def __init__(self, settings: Settings) -> None:
        self.server = uvicorn.Server(server_config(settings, "127.0.0.1", 0))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.05)
            assert self.thread.is_alive()
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def time_pages(url: str, paths: list[str], rounds: int) -> dict[str, float]:
    out = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        # Serve reads the whole journal once at start (about 6,000 records a second here):
        # until then lookups answer 503, and pending counts are not there.
        started, deadline = time.monotonic(), time.monotonic() + 900
        while (
            c.get("/tasks").status_code != 200
            or "Pending counted" not in c.get("/overview/live").text
        ):
            assert time.monotonic() < deadline, "serve did not catch up in 15 minutes"
            time.sleep(1)
        print(f"  {url}: caught up in {time.monotonic() - started:.0f} s", flush=True)
        for path in paths:
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                response = c.get(path)
                times.append(time.perf_counter() - started)
                assert response.status_code == 200, (path, response.status_code)
            out[path] = statistics.median(times)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_TEST_URL", "amqp://localhost/"))
    parser.add_argument("--management", default=os.environ.get("RMQDELAY_TEST_MANAGEMENT_URL"))
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--parked", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--namespace", help="fill (or, with --filled, reuse) this namespace")
    parser.add_argument("--keep", action="store_true", help="leave the filled namespace")
    parser.add_argument("--filled", action="store_true", help="--namespace is filled already")
    args = parser.parse_args()
    if args.filled and not args.namespace:
        parser.error("--filled needs --namespace")
    full = settings_for(args.url, args.management, args.namespace)
    empty = settings_for(args.url, args.management)
    topologies = [(s, build_topology(s.layout, (*DESTINATIONS, "failing"))) for s in (full, empty)]
    for s, topology in topologies:
        await apply_topology(s, topology)
    if args.keep or args.filled:
        topologies = topologies[1:]  # the filled one stays
    try:
        if args.filled:
            first, last = await filled_ids(full, args.pending, args.parked)
        else:
            first, last = await fill(full, args.pending, args.parked)
        paths = [
            "/", "/overview/live", "/tasks", "/tasks?destination=reminders&within=1d",
            "/tasks?key=order:777", f"/tasks/{first}", "/parked", f"/parked/{last}",
            "/unroutable", "/series", "/static/dashboard.css",
        ]  # fmt: skip
        with Serve(full) as full_url, Serve(empty) as empty_url:
            loaded = await asyncio.to_thread(time_pages, full_url, paths, args.rounds)
            bare = await asyncio.to_thread(
                time_pages,
                empty_url,
                [p for p in paths if "/tasks/" not in p and "/parked/" not in p],
                args.rounds,
            )
        taking, logged = await time_show(full, last, args.rounds)
        print(f"\n{args.pending:,} pending, {args.parked:,} parked; median of {args.rounds}")
        print(f"{'page':44} {'loaded':>9} {'empty':>9} {'ratio':>7}  under {BUDGET_S:g} s")
        for path, took in loaded.items():
            base = bare.get(path)
            ratio = f"{took / base:6.1f}x" if base else "      -"
            shown = path if len(path) < 44 else path[:40] + "..."
            ok = "yes" if took < BUDGET_S else "NO"
            print(f"{shown:44} {took:8.3f}s {base or 0:8.3f}s {ratio}  {ok}")
        print(
            f"\nshow the newest parked: taking the lot {taking:.3f} s, from its log "
            f"{logged:.3f} s ({taking / logged:.0f}x faster)"
        )
    finally:
        for s, topology in topologies:
            await apply_topology(s, topology, delete=True)


if __name__ == "__main__":
    asyncio.run(main())
