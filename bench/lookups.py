"""Lookups with many tasks pending: schedule ``--pending`` tasks (spread over the next
days, one key each), then time, for a Scheduler that reads the journal per call and for
one that follows it (``follow_journal()``, as ``rmqdelay serve`` does): catching up, the
first page of a listing, a page further on, a lookup by id and by key.

    .venv/bin/python bench/lookups.py --url amqp://guest:guest@localhost:5730/%2F \\
        --pending 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from rmqdelay import Scheduler, Settings, TaskSpec
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology

DESTINATION = "bench"
#: The command as this interpreter runs it (the virtualenv need not be on PATH).
RMQDELAY = (sys.executable, "-m", "rmqdelay")
BATCH = 1000


async def timed(what: str, call: Callable[[], Awaitable[Any]]) -> Any:
    started = time.perf_counter()
    result = await call()
    print(f"  {what:34} {time.perf_counter() - started:7.3f} s")
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_TEST_URL", "amqp://localhost/"))
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--read", action="store_true", help="also time reading per call")
    parser.add_argument("--namespace", help="reuse this namespace's tasks (kept afterwards)")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="time lookups through 'rmqdelay serve': HTTP, and the CLI with RMQDELAY_API_URL",
    )
    args = parser.parse_args()
    namespace = args.namespace or f"lk-{uuid.uuid4().hex[:6]}"
    settings = Settings(
        _env_file=None, url=args.url, namespace=namespace, max_delay=timedelta(days=30)
    )
    topology = build_topology(settings.layout, (DESTINATION,))
    await apply_topology(settings, topology)
    try:
        async with Scheduler(settings) as scheduler:
            if not args.namespace:
                started = time.perf_counter()
                for start in range(0, args.pending, BATCH):
                    await scheduler.schedule_many(
                        [
                            TaskSpec(
                                DESTINATION,
                                {"n": i},
                                delay=3600 + i % 86400,
                                keys=[f"order:{i}"],
                            )
                            for i in range(start, start + BATCH)
                        ]
                    )
                took = time.perf_counter() - started
                print(f"scheduled {args.pending} in {took:.0f} s")
            if args.serve:
                await asyncio.to_thread(through_serve, settings, args.pending)
                return
            some = (await scheduler.find(key="order:12345")).tasks
            task_id = some[0].id if some else "none"
            if args.read:
                print("reading the journal per call:")
                await timed("find() first page", lambda: scheduler.find(limit=100))
            print("following the journal (follow_journal):")
            await timed("read up to now", lambda: scheduler.follow_journal(wait=True))
            page = await timed("find() first page (100)", lambda: scheduler.find(limit=100))
            await timed("find() next page", lambda: scheduler.find(limit=100, cursor=page.cursor))
            await timed("get(id)", lambda: scheduler.get(task_id))
            await timed("find(key=...)", lambda: scheduler.find(key="order:777"))
            await timed("find(destination=...)", lambda: scheduler.find(destination=DESTINATION))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  client peak RSS {rss:.0f} MB")
    finally:
        if not args.namespace:
            await apply_topology(settings, topology, delete=True)


def environment(settings: Settings) -> dict[str, str]:
    """The environment a command needs to find this namespace."""
    return {
        **os.environ,
        "RMQDELAY_URL": settings.url,
        "RMQDELAY_NAMESPACE": settings.namespace,
        "RMQDELAY_MAX_DELAY": "30d",
    }


def cli(settings: Settings, *argv: str, api: str | None = None) -> float:
    """Seconds one ``rmqdelay`` command took, interpreter start included."""
    env = environment(settings)
    if api is not None:
        env["RMQDELAY_API_URL"] = api
    started = time.perf_counter()
    subprocess.run([*RMQDELAY, *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def through_serve(settings: Settings, pending: int) -> None:
    """Start ``rmqdelay serve``, wait until it has read the journal, then time the API and
    the command line going through it, beside the command line's own start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen(
        [*RMQDELAY, "serve", "--port", str(port)],
        env=environment(settings),
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"{api}/v1/tasks?limit=1", timeout=600) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(1)
        print(f"serve answered its first lookup after {time.perf_counter() - started:.0f} s")

        def get(path: str) -> Any:
            with urllib.request.urlopen(api + path, timeout=60) as reply:
                return json.load(reply)

        def timed_get(what: str, path: str) -> Any:
            started = time.perf_counter()
            body = get(path)
            print(f"  HTTP {what:29} {time.perf_counter() - started:7.3f} s")
            return body

        page = timed_get("first page (100)", "/v1/tasks?limit=100")
        timed_get("next page", f"/v1/tasks?limit=100&cursor={page['cursor']}")
        task_id = get("/v1/tasks?key=order%3A12345")["tasks"][0]["id"]
        timed_get("GET /v1/tasks/{id}", f"/v1/tasks/{task_id}")
        timed_get("by key", "/v1/tasks?key=order%3A777")
        for _ in range(3):  # side by side: the command's own start, then a lookup through serve
            bare = cli(settings, "--version")
            listed = cli(settings, "tasks", "list", "--limit", "100", api=api)
            shown = cli(settings, "tasks", "show", task_id, api=api)
            print(
                f"  CLI --version {bare:.3f} s; tasks list {listed:.3f} s "
                f"({listed / bare:.2f}x); tasks show {shown:.3f} s ({shown / bare:.2f}x)"
            )
        print(f"({pending} pending)")
    finally:
        serve.terminate()
        serve.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
