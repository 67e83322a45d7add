"""Declaring, verifying and (for tests and teardown) deleting a topology; choosing a backend.

Walks the topology data and computes no argument of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ConnectionCommandInvalid,
)

from rmqdelay.broker.connection import connect_once
from rmqdelay.core.delays import delay_to_us, describe_us
from rmqdelay.core.errors import BrokerError, TopologyMismatchError
from rmqdelay.core.topology import ExchangeSpec, QueueSpec, Topology, build_topology
from rmqdelay.settings import Settings

log = logging.getLogger(__name__)


def _mismatch(kind: str, name: str, arguments: Any, error: Exception) -> BrokerError:
    if isinstance(error, ChannelAccessRefused):
        return BrokerError(f"not allowed to declare {kind} {name!r}: {error}")
    return TopologyMismatchError(
        f"{kind} {name!r} already exists with other properties than these settings expect "
        f"(expected arguments {arguments}); broker said: {error}. Use the settings it was "
        "created with (namespace, queue type, resolution, max delay, delivery limit), or "
        "delete it."
    )


Spec = ExchangeSpec | QueueSpec


def _objects(topology: Topology) -> list[Spec]:
    return [*topology.exchanges, *topology.queues]


def _expected_arguments(spec: Spec) -> dict[str, Any]:
    """The arguments an object must have to fit (placement aside)."""
    if isinstance(spec, QueueSpec):
        return {**spec.arguments, **spec.added}
    return dict(spec.arguments)


def _kind(spec: Spec) -> str:
    return "exchange" if isinstance(spec, ExchangeSpec) else "queue"


async def _declare(
    raw: aiormq.abc.AbstractChannel,
    spec: Spec,
    *,
    passive: bool = False,
    placed: bool = True,
    added: bool = True,
) -> None:
    """Declare one exchange or queue as ``spec`` says (``passive``: only that it exists;
    ``placed``: with the queue's placement arguments; ``added``: with the arguments this
    release added)."""
    if isinstance(spec, ExchangeSpec):
        if passive:
            await raw.exchange_declare(spec.name, passive=True)
        else:
            await raw.exchange_declare(
                spec.name, exchange_type=spec.type, durable=True, arguments=dict(spec.arguments)
            )
    elif passive:
        await raw.queue_declare(spec.name, passive=True)
    else:
        arguments: dict[str, Any] = {
            **spec.arguments,
            **(spec.added if added else {}),
            **(spec.placement if placed else {}),
        }
        await raw.queue_declare(spec.name, durable=True, arguments=arguments)


def _about(keys: Iterable[str], error: Exception) -> bool:
    """Whether the broker refused over one of these arguments (it names the first
    argument that differs)."""
    return any(f"inequivalent arg '{key}'" in str(error) for key in keys)


def _lacks(keys: Iterable[str], error: Exception) -> bool:
    """Whether the broker refused because the queue has none of an argument we sent."""
    return _about(keys, error) and str(error).rstrip().endswith("but current is none")


class _Probe:
    """Throwaway channels on the caller's connection, for declares the broker may refuse:
    a refusal closes the channel it came on, which must not be the caller's."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self._connection = connection
        self._raw: aiormq.abc.AbstractChannel | None = None

    async def channel(self) -> aiormq.abc.AbstractChannel:
        if self._raw is None or self._raw.is_closed:
            self._raw = await self._connection.channel()
        return self._raw

    async def exists(self, spec: QueueSpec) -> bool:
        try:
            await _declare(await self.channel(), spec, passive=True)
        except ChannelNotFoundEntity:
            return False
        return True

    async def close(self) -> None:
        if self._raw is not None and not self._raw.is_closed:
            await self._raw.close()


async def _declare_existing(probe: _Probe, spec: QueueSpec) -> None:
    """Check a queue that exists, whose placement may differ from ours and which an
    earlier release may have made without the arguments this one added.

    Placement applies only when a queue is created (one created before these settings, or
    with another RMQDELAY_REPLICAS, keeps its own), and the broker never adds an argument
    to a queue. So: as we would create it; else without placement (a queue created with
    none); else without the added arguments (a queue made by an earlier release: a policy
    brings it up to them, see ``definitions.policies``); else it holds placement arguments
    of its own, and that it exists is what can be checked.

    Raises:
        ChannelPreconditionFailed: other arguments than these differ.
        ChannelAccessRefused: no configure permission.
    """
    placed = added = True
    while True:
        try:
            await _declare(await probe.channel(), spec, placed=placed, added=added)
        except ChannelPreconditionFailed as e:
            if placed and _about(spec.placement, e):
                placed = False
            elif added and _lacks(spec.added, e):
                added = False
            elif _about(spec.placement, e):
                log.info(
                    "queue %r exists with placement other than %s, which applies only to new "
                    "queues: keeping it as it is",
                    spec.name,
                    spec.placement,
                )
                break
            else:
                raise
        else:
            if not placed:
                log.info(
                    "queue %r was created without placement arguments; %s apply only to new "
                    "queues ('rabbitmq-queues grow' adds members)",
                    spec.name,
                    spec.placement,
                )
            break
    if not added:
        # Info, not a warning: a policy puts the limits in force without ever changing
        # this (AMQP cannot see policies), and every start would warn on for good.
        # 'rmqdelay status' warns while no policy gives them.
        log.info(
            "queue %r was made by an earlier rmqdelay without %s (the broker never adds an "
            "argument to a queue that exists): unless a policy gives it that, apply the "
            "namespace's policies ('rmqdelay declare --policies'); 'rmqdelay status' warns "
            "while none is in force",
            spec.name,
            spec.added,
        )


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Declare every exchange, queue and binding of ``topology`` (idempotent).

    Raises:
        TopologyMismatchError: an object exists with other arguments. The broker closes the
            channel on this; open a new one to go on.
    """
    raw = await channel.get_underlay_channel()
    probe = _Probe(raw.connection)
    try:
        for spec in _objects(topology):
            # An existing queue may differ in placement, or lack what this release added,
            # which is no mismatch: check it on the probe's channels. New queues are
            # created on the caller's.
            try:
                if (
                    isinstance(spec, QueueSpec)
                    and (spec.placement or spec.added)
                    and await probe.exists(spec)
                ):
                    await _declare_existing(probe, spec)
                else:
                    await _declare(raw, spec)
            except (ChannelPreconditionFailed, ChannelAccessRefused) as e:
                raise _mismatch(_kind(spec), spec.name, _expected_arguments(spec), e) from e
    finally:
        await probe.close()
    for b in topology.bindings:
        if b.destination_type == "queue":
            await raw.queue_bind(
                b.destination, b.source, b.routing_key, arguments=dict(b.arguments)
            )
        else:
            await raw.exchange_bind(
                b.destination, b.source, b.routing_key, arguments=dict(b.arguments)
            )


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Delete every queue and exchange of ``topology``, messages included. Missing ones are fine."""
    await delete_objects(
        channel, [q.name for q in topology.queues], [x.name for x in topology.exchanges]
    )


async def delete_objects(
    channel: AbstractChannel, queues: Iterable[str], exchanges: Iterable[str]
) -> None:
    """Delete these queues, then these exchanges, messages included. Missing ones are fine."""
    raw: aiormq.abc.AbstractChannel = await channel.get_underlay_channel()
    for queue in queues:
        # if_unused must be off: quorum queues refuse it by closing the whole connection.
        await raw.queue_delete(queue, if_unused=False, if_empty=False)
    for exchange in exchanges:
        try:
            await raw.exchange_delete(exchange, if_unused=False)
        except ChannelNotFoundEntity:  # pragma: no cover - 3.x deletes missing exchanges fine
            raw = await channel.get_underlay_channel()


async def verify_topology(settings: Settings, topology: Topology) -> None:
    """Check that the broker holds ``topology`` as these settings would declare it, creating
    nothing: for clients that do not declare (``RMQDELAY_DECLARE=false``).

    Each object must exist (passive declare); then re-declaring it with the expected
    arguments must succeed, which the broker refuses (406) when they differ and otherwise
    leaves as it is. Without configure permission only existence is checked. Bindings cannot
    be inspected over AMQP and are not checked.

    Raises:
        TopologyMismatchError: an object is missing or has other arguments.
    """
    connection = await connect_once(settings)
    async with connection:
        raw: aiormq.abc.AbstractChannel = await (await connection.channel()).get_underlay_channel()
        probe = _Probe(raw.connection)
        can_compare = True
        for spec in _objects(topology):
            try:
                await _declare(raw, spec, passive=True)
            except ChannelNotFoundEntity as e:
                raise TopologyMismatchError(
                    f"{_kind(spec)} {spec.name!r} does not exist, and RMQDELAY_DECLARE is "
                    f"false: {_expected(settings)}"
                ) from e
            if not can_compare:
                continue
            try:
                if isinstance(spec, QueueSpec) and (spec.placement or spec.added):
                    await _declare_existing(probe, spec)
                else:
                    await _declare(raw, spec)
            except ChannelPreconditionFailed as e:
                raise TopologyMismatchError(
                    f"{_kind(spec)} {spec.name!r} exists with other arguments than these "
                    f"settings expect ({_expected_arguments(spec)}); broker said: {e}. "
                    f"{_expected(settings)}"
                ) from e
            except ChannelAccessRefused:
                can_compare = False
                log.warning(
                    "no configure permission on %r: checking that the topology exists, not "
                    "its arguments",
                    spec.name,
                )
            if raw.is_closed:
                raw = await (await connection.channel()).get_underlay_channel()


def _expected(settings: Settings) -> str:
    return (
        f"the broker's topology does not match namespace {settings.namespace!r}, "
        f"{settings.backend} backend, {settings.queue_type} queues, resolution "
        f"{settings.resolution_ms} ms, max delay "
        f"{describe_us(delay_to_us(settings.max_delay))} ({settings.levels} levels, "
        f"{settings.shards} shard(s)) and delivery limit {settings.delivery_limit}. Import "
        "definitions rendered with the same settings ('rmqdelay definitions ...'), or set "
        "RMQDELAY_DECLARE=true to declare them, or fix these settings"
    )


async def check_topology(settings: Settings, topology: Topology, channel: AbstractChannel) -> None:
    """Declare ``topology`` on ``channel``, or only verify it when declaring is off."""
    if settings.declare:
        await declare_topology(channel, topology)
    else:
        await verify_topology(settings, topology)


async def resolve_backend(settings: Settings) -> Settings:
    """``settings`` with ``backend=auto`` replaced by what the broker supports.

    Probes on a throwaway connection: on RabbitMQ up to 3.13.2 an unknown exchange type
    closes the whole connection (docs/design.md, "Gotchas"), which must not be the client's own.
    """
    if settings.backend != "auto":
        return settings
    plugin = settings.model_copy(update={"backend": "plugin"})
    exchange = next(
        x for x in build_topology(plugin.layout).exchanges if x.type == "x-delayed-message"
    )
    connection = await connect_once(settings)
    async with connection:
        raw = await (await connection.channel()).get_underlay_channel()
        try:
            await _declare(raw, exchange, passive=not settings.declare)
        except (ConnectionCommandInvalid, ChannelPreconditionFailed, ChannelNotFoundEntity) as e:
            # 503 (up to 3.13.2) or 406 (later): unknown exchange type; 404: not imported.
            log.info("backend auto: levels (no delayed-message plugin exchange: %s)", e)
            return settings.model_copy(update={"backend": "levels"})
    log.info("backend auto: the delayed-message plugin (exchange %r)", exchange.name)
    return plugin


async def apply_topology(settings: Settings, topology: Topology, *, delete: bool = False) -> None:
    """Declare (or delete) ``topology`` over a connection of its own, closed afterwards."""
    connection = await connect_once(settings)
    async with connection:
        channel = await connection.channel()
        await (delete_topology if delete else declare_topology)(channel, topology)
