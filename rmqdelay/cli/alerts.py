"""``rmqdelay alerts``: the Prometheus alerting rules for a namespace (no broker needed)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from rmqdelay.core.alerts import Thresholds, rules, to_yaml
from rmqdelay.core.errors import ConfigError
from rmqdelay.settings import Settings


def add_parser(commands: Any, duration: Callable[[str], timedelta]) -> None:
    """The ``alerts`` command."""
    alerts = commands.add_parser(
        "alerts",
        help="print Prometheus alerting rules (YAML) for this namespace; needs no broker",
        description="Alerting rules for tasks parked, unroutable tasks, lateness, a worker's "
        "cancellation set behind, and a destination without a worker. Queue figures come "
        "from RabbitMQ's /metrics/detailed (families queue_coarse_metrics and "
        "queue_consumer_count), the rest from the workers' /metrics.",
    )
    alerts.add_argument("--namespace", default=argparse.SUPPRESS, help="object name prefix")
    defaults = Thresholds()
    alerts.add_argument(
        "--lateness-p99", type=duration, metavar="DURATION",
        default=timedelta(seconds=defaults.lateness_p99_s),
        help="alert when lateness p99 stays above this for 5 minutes (default 30s)",
    )  # fmt: skip
    alerts.add_argument(
        "--cancels-behind", type=duration, metavar="DURATION",
        default=timedelta(seconds=defaults.cancels_behind_s),
        help="alert when a worker's cancellation set is not current for this long "
        "(default 60s)",
    )  # fmt: skip
    alerts.add_argument("-o", "--output", metavar="FILE", help="write here, not stdout")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print (or write) the rules; the exit code."""
    thresholds = Thresholds(
        lateness_p99_s=args.lateness_p99.total_seconds(),
        cancels_behind_s=args.cancels_behind.total_seconds(),
    )
    text = to_yaml(rules(settings.namespace, thresholds)) + "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as out:
                out.write(text)
        except OSError as e:
            raise ConfigError(f"cannot write the alert rules to {args.output!r}: {e}") from e
    else:
        print(text, end="")
    return 0
