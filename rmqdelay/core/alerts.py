"""Prometheus alerting rules for one namespace, as plain data, and their YAML.

What an operator must hear about: tasks parked, the unroutable queue not empty, tasks
running late, a worker whose cancellation set is behind (it runs nothing until it is
current), and a destination no worker consumes. The queue figures come from RabbitMQ's
own Prometheus endpoint (``/metrics/detailed`` with the ``queue_coarse_metrics`` and
``queue_consumer_count`` families), the rest from the workers' ``/metrics``.
``rmqdelay alerts`` prints them; ``tests/alerts/`` checks them with ``promtool``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rmqdelay.core.names import Names


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When an alert fires."""

    #: Lateness p99 over 5 minutes above this many seconds, for 5 minutes.
    lateness_p99_s: float = 30.0
    #: A worker's cancellation set not current for this many seconds.
    cancels_behind_s: float = 60.0
    #: A destination without a consumer for this long.
    no_consumer_for: str = "5m"


def _literal(name: str) -> str:
    """``name`` as a regex of itself. Names hold only ``[A-Za-z0-9_.:-]``, of which only
    the dot means more in a regex; ``[.]`` needs no backslash through PromQL and YAML."""
    return name.replace(".", "[.]")


def rules(namespace: str, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The rule file for ``namespace``: one group, ``rmqdelay-<namespace>``."""
    t = thresholds or Thresholds()
    names = Names(namespace)
    ns = {"namespace": namespace}

    def queue(metric: str, name: str) -> str:
        # Every member of a quorum queue may report it: the largest figure counts once.
        return f"max by (vhost, queue) ({metric}{{queue='{name}'}})"

    def not_empty(alert: str, name: str, severity: str, summary: str, what: str) -> dict[str, Any]:
        """A queue an operator must empty: it holds tasks for a minute."""
        return {
            "alert": alert,
            "expr": f"{queue('rabbitmq_detailed_queue_messages', name)} > 0",
            "for": "1m",
            "labels": {"severity": severity, **ns},
            "annotations": {"summary": "{{ $value }} " + summary + name, "description": what},
        }

    work = f"{_literal(names.work_queue(''))}.+"
    return {
        "groups": [
            {
                "name": f"rmqdelay-{namespace}",
                "rules": [
                    not_empty(
                        "RmqdelayTasksParked",
                        names.parked,
                        "warning",
                        "tasks parked in ",
                        "Tasks that failed their last attempt (or could not be decoded) wait "
                        "in the parking lot with their reason: "
                        f"RMQDELAY_NAMESPACE={namespace} rmqdelay parked lists them; requeue "
                        "or delete them once the cause is fixed.",
                    ),
                    not_empty(
                        "RmqdelayUnroutableNotEmpty",
                        names.unroutable,
                        "critical",
                        "tasks in ",
                        "Tasks whose destination has no work queue (or whose routing headers "
                        "were damaged) wait here: declare the destination, then "
                        f"RMQDELAY_NAMESPACE={namespace} rmqdelay unroutable requeue --all.",
                    ),
                    {
                        "alert": "RmqdelayTasksLate",
                        "expr": "histogram_quantile(0.99, sum by (destination, le) "
                        "(rate(rmqdelay_task_lateness_seconds_bucket"
                        f"{{namespace='{namespace}'}}[5m]))) > {t.lateness_p99_s:g}",
                        "for": "5m",
                        "labels": {"severity": "warning", **ns},
                        "annotations": {
                            "summary": "destination {{ $labels.destination }}: lateness "
                            "p99 {{ $value | humanizeDuration }}",
                            "description": "Tasks start later than their due time: too few "
                            "workers or handler slots for the rate, a backlog after an "
                            "outage, or a broker short of CPU. rmqdelay status shows the "
                            "depths.",
                        },
                    },
                    {
                        "alert": "RmqdelayCancelsBehind",
                        "expr": "max by (instance, destination) (rmqdelay_cancels_behind_seconds"
                        f"{{namespace='{namespace}'}}) > {t.cancels_behind_s:g}",
                        "labels": {"severity": "critical", **ns},
                        "annotations": {
                            "summary": "worker {{ $labels.instance }}: cancellation set "
                            "behind for {{ $value | humanizeDuration }}",
                            "description": "A worker runs nothing until its cancellation "
                            "set is current again: its link to the cancellation stream is "
                            "down, or the stream does not answer.",
                        },
                    },
                    {
                        "alert": "RmqdelayNoConsumer",
                        "expr": "max by (vhost, queue) (rabbitmq_detailed_queue_consumers"
                        f"{{queue=~'{work}'}}) == 0",
                        "for": t.no_consumer_for,
                        "labels": {"severity": "critical", **ns},
                        "annotations": {
                            "summary": "no worker consumes {{ $labels.queue }}",
                            "description": "Tasks of this destination come due and nothing "
                            "runs them: start rmqdelay consume for it (or delete a "
                            "destination no longer used).",
                        },
                    },
                ],
            }
        ]
    }


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for the plain data above: mappings, lists, strings and numbers, every string
    double-quoted (a JSON string is a YAML double-quoted scalar)."""
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        lines = []
        for item in value:
            inner = to_yaml(item, indent + 1) if isinstance(item, dict | list) else None
            if inner is None:
                lines.append(f"{pad}- {_scalar(item)}")
            else:
                lines.append(f"{pad}- {inner.lstrip()}")
        return "\n".join(lines)
    return f"{pad}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(str(value), ensure_ascii=False)
