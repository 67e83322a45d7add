"""The ``rmqdelay`` command.

Exit codes: 0 success, 1 an rmqdelay error (message on stderr), 2 bad usage, 3 a worker
stopped but had to abandon handlers that did not finish (their tasks are back in the
queue), 130 interrupted before finishing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from importlib.metadata import version
from typing import Any

from rmqdelay.broker.management import vhost_of
from rmqdelay.broker.scheduler import Scheduler, TaskSpec, check_task
from rmqdelay.cli import alerts as alerts_cmd
from rmqdelay.cli import aside as aside_cmd
from rmqdelay.cli import recurring as recurring_cmd
from rmqdelay.cli import tasks as tasks_cmd
from rmqdelay.cli.arguments import (
    duration,
    hops,
    int_between,
    join_negative_values,
    signed_duration,
)
from rmqdelay.cli.demo import run_demo
from rmqdelay.core.definitions import DefinitionOptions, render_definitions
from rmqdelay.core.errors import ConfigError, RmqDelayError
from rmqdelay.core.redact import Redactor
from rmqdelay.core.task import Handler
from rmqdelay.core.topology import build_topology
from rmqdelay.settings import Settings
from rmqdelay.tools.bridge import Bridge, drain, plan_bridge
from rmqdelay.tools.destroy import destroy as destroy_namespace
from rmqdelay.tools.destroy import plan_destroy
from rmqdelay.tools.forward import Forwarder, parse_target
from rmqdelay.tools.logs import LOG_LEVELS, configure_logging, escape_controls
from rmqdelay.tools.pending import pending as pending_of
from rmqdelay.tools.pending import render as render_pending
from rmqdelay.tools.policies import apply_policies
from rmqdelay.tools.status import collect, render
from rmqdelay.tools.webhook import WebhookHandler
from rmqdelay.worker.consume import Worker
from rmqdelay.worker.handler import load_handler
from rmqdelay.worker.stats import WorkerStats

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2
RET_ABANDONED = 3
RET_INTERRUPTED = 130

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; settings not given here come from RMQDELAY_* variables."""
    parser = argparse.ArgumentParser(
        prog="rmqdelay", description="Delayed and scheduled tasks on RabbitMQ."
    )
    parser.add_argument("--url", help="AMQP URL (default: RMQDELAY_URL)")
    parser.add_argument("--namespace", help="object name prefix (default: RMQDELAY_NAMESPACE)")
    parser.add_argument("--version", action="version", version=f"rmqdelay {version('rmqdelay')}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=LOG_LEVELS,
        help="DEBUG: one line per task; TRACE: also the AMQP libraries' frames (payloads)",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="json: one object a line"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    consume = commands.add_parser("consume", help="run a worker for a destination")
    consume.add_argument("destination")
    handler = consume.add_mutually_exclusive_group(required=True)
    handler.add_argument("--handler", help="package.module:function")
    handler.add_argument(
        "--webhook",
        metavar="URL",
        help="POST each task as JSON to URL (shows in 'ps': prefer --webhook-env or "
        "--webhook-file for a URL that holds a token)",
    )
    handler.add_argument(
        "--webhook-env", metavar="NAME", help="like --webhook, the URL read from variable NAME"
    )
    handler.add_argument(
        "--webhook-file", metavar="FILE", help="like --webhook, the URL read from FILE"
    )
    handler.add_argument(
        "--forward",
        metavar="EXCHANGE[:ROUTING_KEY]",
        help="publish each task's original message to EXCHANGE (split at the first colon; "
        "routing key default: the destination)",
    )
    consume.add_argument(
        "--concurrency", type=int_between(1, 10_000), help="handlers at once (1-10000)"
    )
    consume.add_argument(
        "--prefetch", type=int_between(1, 65_535), help="unacked deliveries (1-65535)"
    )
    consume.add_argument(
        "--metrics-port",
        type=int_between(0, 65_535),
        help="serve Prometheus /metrics and /healthz on this port (0: any free one)",
    )
    consume.add_argument(
        "--max-attempts", type=int_between(1, 1000), help="executions before parking (1-1000)"
    )
    consume.add_argument(
        "--backoff-base", type=duration, metavar="DURATION", help="first backoff, e.g. 1s, 500ms"
    )
    consume.add_argument(
        "--backoff-cap", type=duration, metavar="DURATION", help="longest backoff, e.g. 1h"
    )
    consume.add_argument(
        "--handler-timeout", type=duration, metavar="DURATION", help="a longer run has failed"
    )
    consume.add_argument(
        "--accept",
        action="append",
        metavar="CONTENT_TYPE",
        help="content types to hand to the handler (repeatable; default JSON, octet-stream, "
        "text/plain); others are parked",
    )

    bridge = commands.add_parser(
        "bridge",
        help="take publishers of a delayed-message plugin exchange over (docs/how-to/plugin.md)",
        description="Publishers go on sending to exchange FROM with an x-delay header; each "
        "message waits in the levels and is then published, as it was sent, to exchange TO, "
        "where consumers' queues are bound.",
    )
    bridge.add_argument("--from", dest="source", required=True, metavar="EXCHANGE")
    bridge.add_argument("--to", dest="target", metavar="EXCHANGE", help="default: FROM.due")
    bridge.add_argument(
        "--type",
        dest="target_type",
        default="direct",
        help="the target's type when rmqdelay creates it (--switch takes the plugin's)",
    )
    bridge.add_argument("--destination", help="the bridge's own destination (bridge.FROM)")
    bridge.add_argument(
        "--switch", action="store_true", help="replace the plugin's exchange FROM (drain first)"
    )
    bridge.add_argument(
        "--force", action="store_true", help="switch even though the plugin still holds messages"
    )
    bridge.add_argument(
        "--drain",
        action="store_true",
        help="only wait until the plugin's exchange FROM holds no delayed messages",
    )
    bridge.add_argument("--timeout", type=duration, metavar="DURATION", help="--drain's limit")
    bridge.add_argument(
        "--declare-only", action="store_true", help="declare (or switch), then exit"
    )
    bridge.add_argument(
        "--concurrency", type=int_between(1, 10_000), help="forwards at once (1-10000)"
    )

    serve = commands.add_parser(
        "serve",
        help="an HTTP API to schedule, cancel, look up and reschedule (needs rmqdelay[http])",
        description="POST /v1/tasks, DELETE /v1/keys/{key}, GET /healthz, /openapi.json. "
        "Set RMQDELAY_HTTP_TOKEN; without it only a loopback address is served.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--port", type=int_between(0, 65_535), default=8080, help="port to listen on"
    )

    recurring_cmd.add_parser(commands, duration)
    alerts_cmd.add_parser(commands, duration)
    tasks_cmd.add_parsers(commands, duration)

    schedule = commands.add_parser("schedule", help="schedule one task")
    schedule.add_argument("destination")
    schedule.add_argument("payload", help="JSON text ('-' reads stdin); raw with --content-type")
    when = schedule.add_mutually_exclusive_group(required=True)
    when.add_argument("--delay", help="e.g. 250ms, 90s, 30m, 2h, 3d, 1h30m")
    when.add_argument("--at", help="ISO 8601 with a UTC offset, e.g. 2026-12-01T08:00:00+08:00")
    schedule.add_argument("--content-type", help="send the payload as raw bytes of this type")
    schedule.add_argument("--id", dest="task_id", help="task id (default: a new UUID)")
    schedule.add_argument(
        "--key", dest="keys", action="append", default=[], help="cancel key (repeatable)"
    )
    schedule.add_argument(
        "--replace", action="store_true", help="cancel the tasks under --key first (reschedule)"
    )

    cancel = commands.add_parser("cancel", help="call off every pending task under a key or id")
    cancel.add_argument("keys", nargs="+", metavar="KEY")
    cancel.add_argument(
        "--count",
        action="store_true",
        help="first count the pending tasks under each key (reads the journal)",
    )
    cancel.add_argument(
        "--until",
        help="forget the cancel after this (a delay such as 2h, or ISO 8601 with a UTC "
        "offset): the due time of the last task it calls off (default: the retention)",
    )

    declare = commands.add_parser("declare", help="declare the topology (and work queues)")
    declare.add_argument("destinations", nargs="*", help="also declare these work queues")
    declare.add_argument(
        "--policies",
        action="store_true",
        help="also put the namespace's policies in force through the management API (brings "
        "queues made by earlier releases up to this one's delivery limits)",
    )

    aside_cmd.add_parsers(commands)

    definitions = commands.add_parser(
        "definitions",
        help="print RabbitMQ definitions (JSON) for ops to import; needs no broker",
        description="Render the topology these settings declare as RabbitMQ definitions, for "
        "rabbitmqctl import_definitions, the management API or load_definitions.",
    )
    definitions.add_argument("destinations", nargs="*", help="also render these work queues")
    definitions.add_argument("--namespace", default=argparse.SUPPRESS, help="object name prefix")
    definitions.add_argument(
        "--vhost", help="virtual host (default: the one RMQDELAY_URL names, else /)"
    )
    definitions.add_argument("--queue-type", choices=["quorum", "classic"])
    definitions.add_argument("--resolution-ms", type=int, help="delay unit in milliseconds")
    definitions.add_argument("--max-delay", help="longest delay, e.g. 3653d or 30d")
    definitions.add_argument("--backend", choices=["levels", "plugin"])
    definitions.add_argument("--shards", type=int, help="level sets (RMQDELAY_SHARDS)")
    definitions.add_argument(
        "--replicas", type=int, help="members of each new queue (RMQDELAY_REPLICAS; 0: broker's)"
    )
    definitions.add_argument(
        "--user", help="grant this existing user access to the namespace's objects (no password)"
    )
    definitions.add_argument(
        "--policies", action="store_true", help="include the recommended policies"
    )
    definitions.add_argument(
        "--delivery-limit",
        type=int,
        help="deliveries of one task before its work queue parks it (RMQDELAY_DELIVERY_LIMIT, "
        "default 20; quorum only)",
    )
    definitions.add_argument("-o", "--output", metavar="FILE", help="write here, not stdout")

    status = commands.add_parser(
        "status", help="what is pending: levels, destinations, parking lot, cancels"
    )
    status.add_argument("destinations", nargs="*", help="destinations to show (default: all)")
    status.add_argument("--json", action="store_true", help="one JSON document")
    status.add_argument(
        "--watch",
        type=duration,
        metavar="DURATION",
        help="refresh every DURATION (e.g. 5s) until interrupted",
    )

    pending = commands.add_parser(
        "pending", help="how many tasks are due within a second, minute, hour, day, week"
    )
    pending.add_argument("destinations", nargs="*", help="destinations to show (default: all)")
    pending.add_argument("--json", action="store_true", help="one JSON document")

    destroy = commands.add_parser(
        "destroy",
        help="delete a namespace: every queue (messages included) and exchange",
        description="Delete every queue and exchange of the namespace (--namespace or "
        "RMQDELAY_NAMESPACE), messages included. Found through the management API; without "
        "it, by name, and work queues only of the destinations named.",
    )
    destroy.add_argument("destinations", nargs="*", help="work queues to include by name")
    destroy.add_argument("--namespace", default=argparse.SUPPRESS, help="the namespace")
    destroy.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    destroy.add_argument("--force", action="store_true", help="even while workers consume from it")

    commands.add_parser("demo", help="a short live run: schedule, execute, show lateness")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    fields = (
        "url",
        "namespace",
        "queue_type",
        "resolution_ms",
        "max_delay",
        "backend",
        "shards",
        "replicas",
        "max_attempts",
        "backoff_base",
        "backoff_cap",
        "handler_timeout",
        "delivery_limit",
    )
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    return Settings(**overrides)


def _webhook_url(args: argparse.Namespace) -> str | None:
    """The webhook URL from --webhook, --webhook-env or --webhook-file (None: no hook).
    The last two keep a token in the URL out of the process list."""
    if args.webhook_env:
        url = os.environ.get(args.webhook_env, "").strip()
        if not url:
            raise ConfigError(f"--webhook-env {args.webhook_env}: that variable is unset or empty")
        return url
    if args.webhook_file:
        try:
            with open(args.webhook_file, encoding="utf-8") as file:
                url = file.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--webhook-file {args.webhook_file!r}: {e}") from None
        if not url:
            raise ConfigError(f"--webhook-file {args.webhook_file!r} holds no URL")
        return url
    return args.webhook or None


async def _consume(args: argparse.Namespace, settings: Settings) -> int:
    if args.forward:
        exchange, routing_key = parse_target(args.forward)
        async with Forwarder(settings, exchange, routing_key) as forwarder:
            return await _run_worker(args, settings, forwarder, raw=True)
    if hook := _webhook_url(args):
        async with WebhookHandler(hook) as webhook:
            _secrets.add(*webhook.redact.secrets)
            return await _run_worker(args, settings, webhook)
    # As other worker commands do: `--handler tasks:fn` finds tasks.py in this folder.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return await _run_worker(args, settings, load_handler(args.handler))


async def _run_worker(
    args: argparse.Namespace, settings: Settings, handler: Handler, *, raw: bool = False
) -> int:
    worker = Worker(
        settings,
        args.destination,
        handler,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        accept=args.accept,
        raw=raw,
        metrics_port=args.metrics_port,
    )
    return await _until_signalled(worker.run)


async def _until_signalled(run: Callable[[asyncio.Event], Awaitable[WorkerStats]]) -> int:
    """Run a worker (or a bridge) until SIGINT or SIGTERM; its exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stopper(stop, sig))
    stats = await run(stop)
    return RET_ABANDONED if stats.abandoned else RET_OK


async def _bridge(args: argparse.Namespace, settings: Settings) -> int:
    if args.concurrency:
        settings = settings.model_copy(update={"concurrency": args.concurrency})
    if args.drain:
        timeout = args.timeout.total_seconds() if args.timeout else 3600.0
        held = await drain(settings, args.source, timeout_s=timeout)
        if held:
            print(f"{args.source!r} still holds {held} delayed message(s) after {timeout:g}s")
            return RET_ERROR
        print(f"{args.source!r} holds no delayed messages: switch now (--switch)")
        return RET_OK
    plan = plan_bridge(
        settings,
        args.source,
        target=args.target,
        target_type=args.target_type,
        destination=args.destination,
    )
    bridge = Bridge(settings, plan)
    print(await bridge.prepare(switch=args.switch, force=args.force))
    if args.declare_only:
        return RET_OK
    return await _until_signalled(bridge.run)


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from rmqdelay.web.api import serve
    except ImportError as e:
        raise ConfigError(
            f"rmqdelay serve needs the http extra ({e.name} is missing): "
            "pip install 'rmqdelay[http]'"
        ) from None
    if settings.http_token:
        _secrets.add(settings.http_token.get_secret_value())
    await serve(settings, args.host, args.port)
    return RET_OK


def _stopper(stop: asyncio.Event, sig: signal.Signals) -> Any:
    def handle() -> None:
        log.info("%s received: finishing in-flight tasks, then stopping", sig.name)
        stop.set()

    return handle


def _payload(args: argparse.Namespace, limit: int) -> Any:
    """The payload as given: bytes with --content-type, else parsed JSON. From stdin
    ('-') it is read as bytes, at most ``limit`` (RMQDELAY_MAX_MESSAGE_SIZE) of them."""
    if args.payload == "-":
        data = sys.stdin.buffer.read(limit + 1)
        if len(data) > limit:
            raise ConfigError(
                f"the payload on stdin is over {limit} bytes (RMQDELAY_MAX_MESSAGE_SIZE); "
                "keep large data elsewhere and schedule a reference to it"
            )
    else:  # the bytes the shell passed, even those that are not UTF-8
        data = os.fsencode(args.payload)
    if args.content_type:
        return data
    try:
        return json.loads(data)
    except ValueError as e:
        shown = data[:60].decode(errors="replace")
        raise ConfigError(
            f"payload {shown!r} is not JSON ({e}); quote strings as '\"text\"' or "
            "pass --content-type to send raw bytes"
        ) from e
    except RecursionError as e:
        raise ConfigError("payload is JSON nested too deeply to read; flatten it") from e


def _at(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as e:
        raise ConfigError(f"--at {text!r} is not an ISO 8601 date-time") from e


async def _schedule(args: argparse.Namespace, settings: Settings) -> int:
    payload = _payload(args, settings.max_message_size)
    when: dict[str, Any] = (
        {"delay": signed_duration(args.delay)} if args.delay is not None else {"at": _at(args.at)}
    )
    task: dict[str, Any] = {
        "content_type": args.content_type,
        "task_id": args.task_id,
        "keys": args.keys,
        "replace": args.replace,
        **when,
    }
    check_task(settings.wiring, TaskSpec(args.destination, payload, **task))  # bad input: no I/O
    async with Scheduler(settings) as scheduler:
        s = await scheduler.schedule(args.destination, payload, **task)
    under = f" under {', '.join(s.keys)}" if s.keys else ""
    replaced = " (earlier tasks under them cancelled)" if args.replace else ""
    print(
        escape_controls(
            f"scheduled {s.id} for {s.destination}{under}{replaced}, due "
            f"{s.due_at.isoformat()} ({hops(s.hops)})"
        )
    )
    return RET_OK


async def _recurring(args: argparse.Namespace, settings: Settings) -> int:
    payload = _payload(args, settings.max_message_size) if args.action == "add" else None
    return await recurring_cmd.run(args, settings, payload)


async def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    until = None
    if args.until is not None:
        until = _at(args.until) if "T" in args.until else signed_duration(args.until)
    async with Scheduler(settings) as scheduler:
        for key in args.keys:
            c = await scheduler.cancel(key, until=until, count=args.count)
            hit = (
                "whether any was pending is not known here ('--count' reads the journal)"
                if c.pending is None
                else f"{c.pending} pending"
            )
            print(
                escape_controls(
                    f"cancelled {c.key!r} at {c.at.isoformat()}: tasks under it published "
                    f"before then will not run (workers log each one they skip; {hit})"
                )
            )
    return RET_OK


async def _declare(args: argparse.Namespace, settings: Settings) -> int:
    # Declaring is this command's whole point, whatever RMQDELAY_DECLARE says.
    settings = settings.model_copy(update={"declare": True})
    async with Scheduler(settings) as scheduler:
        for destination in args.destinations:
            await scheduler.declare_destination(destination)
    print(
        f"declared namespace {settings.namespace!r}: {settings.levels} levels at "
        f"{settings.resolution_ms} ms ({settings.queue_type})"
        + (f", destinations {', '.join(args.destinations)}" if args.destinations else "")
    )
    if args.policies:
        applied = await apply_policies(settings)
        print(f"policies in force: {', '.join(applied) or 'none (classic queues)'}")
    return RET_OK


async def _aside(args: argparse.Namespace, settings: Settings) -> int:
    return await aside_cmd.run(args, settings, _confirm)


def _definitions(args: argparse.Namespace, settings: Settings) -> int:
    layout = settings.layout
    destinations = tuple(settings.names.check_destination(d) for d in args.destinations)
    options = DefinitionOptions(
        vhost=args.vhost if args.vhost is not None else vhost_of(settings.url),
        user=args.user,
        policies=args.policies,
    )
    text = json.dumps(
        render_definitions(layout, build_topology(layout, destinations), options), indent=2
    )
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(text + "\n")
        except OSError as e:
            raise ConfigError(f"cannot write definitions to {args.output!r}: {e}") from e
    else:
        print(text)
    return RET_OK


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    for destination in args.destinations:
        settings.names.check_destination(destination)
    if args.watch is not None and args.watch <= timedelta(0):
        raise ConfigError(f"--watch must be a positive duration, got {args.watch}")
    while True:
        status = await collect(settings, args.destinations)
        if args.json:
            print(json.dumps(status.as_json()), flush=True)
        else:
            if args.watch is not None and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # clear the screen between refreshes
            print(render(status), flush=True)
        if args.watch is None:
            return RET_OK
        await asyncio.sleep(args.watch.total_seconds())


async def _pending(args: argparse.Namespace, settings: Settings) -> int:
    found = await pending_of(settings, args.destinations)
    print(json.dumps(found.as_json()) if args.json else render_pending(found))
    return RET_OK


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    return await run_demo(settings)


async def _destroy(args: argparse.Namespace, settings: Settings) -> int:
    destinations = [settings.names.check_destination(d) for d in args.destinations]
    plan = await plan_destroy(settings, destinations)
    # Exchanges left without queues count only when listed: guessed names may not exist.
    if not plan.queues and (not plan.listed or not plan.exchanges):
        print(f"namespace {settings.namespace!r} has nothing in vhost {vhost_of(settings.url)!r}")
        return RET_OK
    if plan.consumed and not args.force:
        busy = ", ".join(f"{q} ({n})" for q, n in sorted(plan.consumed.items()))
        raise ConfigError(
            f"workers are consuming from namespace {settings.namespace!r} ({busy}); stop them "
            "first, or pass --force"
        )
    if not plan.listed:
        print(
            "note: management API not reachable: found objects by name; work queues of "
            "destinations not named on the command line are left",
            file=sys.stderr,
        )
    if not args.yes and not await _confirm(f"delete {plan.describe()}? [y/N] "):
        print("nothing deleted")
        return RET_OK
    await destroy_namespace(settings, plan)
    print(f"deleted {plan.describe()}")
    return RET_OK


async def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError("refusing without a terminal to confirm on; pass --yes")
    answer = await asyncio.to_thread(input, prompt)
    return answer.strip().lower() in ("y", "yes")


async def _tasks(args: argparse.Namespace, settings: Settings) -> int:
    return await tasks_cmd.run_tasks(args, settings, duration)


async def _transfer(args: argparse.Namespace, settings: Settings) -> int:
    # The target's password must not show in a log line either.
    return await tasks_cmd.run_transfer(args, settings, lambda t: _secrets.add(*t.secrets))


_COMMANDS = {
    "consume": _consume,
    "bridge": _bridge,
    "serve": _serve,
    "schedule": _schedule,
    "cancel": _cancel,
    "declare": _declare,
    "parked": _aside,
    "unroutable": _aside,
    "recurring": _recurring,
    "status": _status,
    "pending": _pending,
    "demo": _demo,
    "destroy": _destroy,
    "tasks": _tasks,
    "reschedule": tasks_cmd.run_reschedule,
    "export": tasks_cmd.run_export,
    "import": tasks_cmd.run_import,
    "transfer": _transfer,
}
#: Secrets the CLI's log lines must never show: the broker password, webhook URL parts.
_secrets = Redactor()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(
        join_negative_values(list(sys.argv[1:] if argv is None else argv))
    )
    configure_logging(args.log_level, args.log_format, _secrets)
    try:
        settings = _settings(args)
        _secrets.add(*settings.secrets)
        if args.command == "definitions":  # no broker, no event loop
            return _definitions(args, settings)
        if args.command == "alerts":
            return alerts_cmd.run(args, settings)
        return asyncio.run(_COMMANDS[args.command](args, settings))
    except RmqDelayError as e:
        print(f"rmqdelay: error: {e}", file=sys.stderr)
        return RET_ERROR
    except KeyboardInterrupt:
        return RET_INTERRUPTED
    except BrokenPipeError:
        # The reader went away ('| head -1'): stop quietly, as other Unix tools do, and
        # keep the interpreter from failing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return RET_ERROR
