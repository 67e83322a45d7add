"""How a broker counts returns of a quorum-queue message toward its delivery limit.

For each way of setting the limit (none, 2^31-1, -1) and each way of returning a message
(basic.get then closing the channel, basic.nack, basic.reject), publish one message to a
fresh quorum queue, take it and return it 25 times, and report whether it is still there
and the counts the broker put in its headers. docs/design.md ("RabbitMQ versions") has
the table for 3.10.8, 4.0.5 and 4.3.6.

    python bench/delivery_counts.py amqp://guest:guest@localhost:5730/%2F
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractRobustConnection

RETURNS = 25
LIMITS: dict[str, dict[str, int]] = {
    "none set": {},
    "2^31-1": {"x-delivery-limit": 2**31 - 1},
    "-1": {"x-delivery-limit": -1},
}
WAYS = ("get+close", "nack", "reject")


async def _one_try(connection: AbstractRobustConnection, queue: str, way: str) -> dict | None:
    """Take the message on a channel of its own and return it ``way``; its headers, or
    None when the queue has nothing to give."""
    channel = await connection.channel()
    try:
        taken = await channel.get_queue(queue, ensure=False)
        for _ in range(50):  # a returned message may take a moment to be ready again
            message = await taken.get(no_ack=False, fail=False)
            if message is not None:
                break
            await asyncio.sleep(0.05)
        else:
            return None
        headers = dict(message.headers or {})
        if way == "nack":
            await message.nack(requeue=True)
        elif way == "reject":
            await message.reject(requeue=True)
        return headers
    finally:
        await channel.close()


async def _measure(
    connection: AbstractRobustConnection, arguments: dict[str, int], way: str
) -> str:
    queue = f"bench.delivery-counts.{uuid.uuid4().hex[:8]}"
    channel = await connection.channel()
    try:
        await channel.declare_queue(
            queue, durable=True, arguments={"x-queue-type": "quorum", **arguments}
        )
    except aio_pika.exceptions.AMQPError as e:
        return f"refused: {e}"
    await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue)
    last: dict | None = None
    try:
        for n in range(RETURNS):
            headers = await _one_try(connection, queue, way)
            if headers is None:
                return f"gone after {n} returns (last headers {last})"
            last = headers
        return f"kept after {RETURNS} returns, last headers {last}"
    finally:
        await (await connection.channel()).queue_delete(queue)


async def main(url: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        version = connection.transport.connection.server_properties.get("version")
        print(f"RabbitMQ {version}")
        for name, arguments in LIMITS.items():
            for way in WAYS:
                print(f"  limit {name:9} {way:10} {await _measure(connection, arguments, way)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="AMQP URL of the broker to probe")
    asyncio.run(main(parser.parse_args().url))
