"""A worker's start against a long cancellation history: replaying it all, or loading a
snapshot and replaying the rest.

    .venv/bin/python bench/cancel_history.py --records 10000000 --live 1000000

Writes ``--records`` cancel records into a fresh namespace's stream, of which ``--live``
last the retention and the rest have expired by the time a worker starts. Then starts a
cancel follower (as a worker runs it) twice, each in a process of its own so that its
memory is its own: first with no snapshot (a full replay; it then writes a snapshot), then
again (it loads that snapshot). Reports each start's time, records read, live keys and
peak RSS, and the ratio of the two start times. The namespace is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid

import aiormq
from pamqp.commands import Basic

from rmqdelay import Settings
from rmqdelay.broker.cancels import CancelFollower
from rmqdelay.broker.declare import apply_topology
from rmqdelay.core.topology import build_topology
from rmqdelay.core.wire import cancel_headers

#: Publishes between round trips while filling the stream (no confirms: speed; a
#: round trip per window keeps the client from running far ahead of the broker).
WINDOW = 20_000


async def fill(settings: Settings, records: int, live: int) -> float:
    """Publish the history; returns records per second."""
    connection = await aiormq.connect(settings.urls[0])
    channel = await connection.channel(publisher_confirms=False)
    now_ms = time.time_ns() // 1_000_000
    every = max(1, records // max(1, live))
    started = time.monotonic()
    for i in range(records):
        if i % every == 0 and i // every < live:
            headers = cancel_headers(f"live:{i // every:012d}", now_ms)  # the retention
        else:
            headers = cancel_headers(f"gone:{i:012d}", now_ms, now_ms + 1)  # expired soon
        props = Basic.Properties(headers=headers, delivery_mode=2)
        await channel.basic_publish(b"", routing_key=settings.names.cancels, properties=props)
        if i % WINDOW == 0:
            await channel.basic_qos(prefetch_count=0)  # a round trip: the broker keeps up
        if i and i % 1_000_000 == 0:
            print(f"  {i:,} records written", file=sys.stderr)
    await channel.basic_qos(prefetch_count=0)
    rate = records / (time.monotonic() - started)
    await connection.close()
    return rate


async def follow(settings: Settings, write_snapshot: bool) -> dict[str, object]:
    """One worker's start: until its cancel set is caught up."""
    follower, stop = CancelFollower(settings), asyncio.Event()
    started, cpu = time.monotonic(), time.process_time()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.caught_up.wait(), 3600)
    seconds = time.monotonic() - started
    result: dict[str, object] = {
        "seconds": round(seconds, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "records_read": follower.records_seen,
        "live_keys": len(follower.cancels),
        "snapshot_keys": follower.loaded_snapshot[0] if follower.loaded_snapshot else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    follower.cancels.expire(time.time_ns() // 1_000_000)
    result["live_keys_after_expiry"] = len(follower.cancels)
    if write_snapshot:
        written_at = time.monotonic()
        await follower.write_snapshot()
        result["snapshot_write_s"] = round(time.monotonic() - written_at, 1)
    stop.set()
    await task
    return result


def in_process(args: argparse.Namespace, namespace: str, write_snapshot: bool) -> dict[str, object]:
    command = [sys.executable, __file__, "--url", args.url, "--follow", namespace]
    if write_snapshot:
        command.append("--write-snapshot")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RMQDELAY_URL", Settings().url))
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--live", type=int, default=1_000_000)
    parser.add_argument("--follow", metavar="NAMESPACE", help=argparse.SUPPRESS)
    parser.add_argument("--write-snapshot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        settings = Settings(_env_file=None, url=args.url, namespace=args.follow)
        print(json.dumps(asyncio.run(follow(settings, args.write_snapshot))))
        return
    settings = Settings(_env_file=None, url=args.url, namespace=f"hist-{uuid.uuid4().hex[:6]}")
    topology = build_topology(settings.layout)
    asyncio.run(apply_topology(settings, topology))
    try:
        rate = asyncio.run(fill(settings, args.records, args.live))
        print(f"{args.records:,} cancel records ({args.live:,} live) written at {rate:,.0f}/s")
        time.sleep(2)  # let the "expired soon" ones expire
        replay = in_process(args, settings.namespace, write_snapshot=True)
        print(f"start with a full replay:  {json.dumps(replay)}")
        snapshot = in_process(args, settings.namespace, write_snapshot=False)
        print(f"start from the snapshot:   {json.dumps(snapshot)}")
        ratio = float(str(replay["seconds"])) / max(0.1, float(str(snapshot["seconds"])))
        print(f"start time, replay / snapshot: {ratio:.0f}x")
    finally:
        asyncio.run(apply_topology(settings, topology, delete=True))


if __name__ == "__main__":
    main()
