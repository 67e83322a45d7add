"""``rmqdelay pending``: how many tasks are due in the next second, minute, hour, day,
week and later, from the queue counts ``rmqdelay status`` reads (core/pending.py says
how a count bounds a due time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rmqdelay.core.pending import Window, windows
from rmqdelay.settings import Settings
from rmqdelay.tools.status import collect

PRECISION = (
    "a task counted in a window is due by its end, perhaps much sooner: one in delay level "
    "k is due within 2^(k+1) units of RMQDELAY_RESOLUTION_MS; level counts cover every "
    "destination together (queues do not say which task is whose), work-queue counts are "
    "per destination; 'held or running' cannot be split by the broker"
)


@dataclass(frozen=True, slots=True)
class DestinationPending:
    """One destination's work queue: tasks due now or within a unit."""

    destination: str
    ready: int | None
    held_or_running: int | None


@dataclass(frozen=True, slots=True)
class Pending:
    """What is due when, as sampled at ``sampled_at``."""

    namespace: str
    sampled_at: str
    resolution_ms: int
    windows: list[Window]
    destinations: list[DestinationPending]
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "namespace": self.namespace,
            "sampled_at": self.sampled_at,
            "resolution_ms": self.resolution_ms,
            "windows": [
                {
                    "window": w.name,
                    "ends_s": w.ends_s,
                    "in_levels": w.in_levels,
                    "ready": w.ready,
                    "held_or_running": w.held_or_running,
                    "total": w.total,
                }
                for w in self.windows
            ],
            "destinations": [
                {
                    "destination": d.destination,
                    "ready": d.ready,
                    "held_or_running": d.held_or_running,
                }
                for d in self.destinations
            ],
            "precision": PRECISION,
            "notes": self.notes,
        }


async def pending(settings: Settings, destinations: list[str] | None = None) -> Pending:
    """What the namespace holds, by when it is due (every destination, or those named)."""
    status = await collect(settings, destinations or [])
    levels = [(lv.level, lv.pending or 0) for lv in status.levels]
    work = [(d.ready or 0, d.unacked or 0) for d in status.destinations]
    return Pending(
        namespace=status.namespace,
        sampled_at=status.sampled_at,
        resolution_ms=settings.resolution_ms,
        windows=windows(levels, work, settings.resolution_ms, settings.hold_window_s),
        destinations=[DestinationPending(d.name, d.ready, d.unacked) for d in status.destinations],
        notes=status.notes,
    )


def render(p: Pending) -> str:
    """The table ``rmqdelay pending`` prints."""
    lines = [
        f"namespace {p.namespace}  sampled {p.sampled_at}  unit {p.resolution_ms} ms",
        "",
        f"{'due within':<12}{'in levels':>12}{'ready':>10}{'held/running':>14}{'total':>10}",
    ]
    for w in p.windows:
        name = "later" if w.ends_s is None else f"1 {w.name}"
        lines.append(
            f"{name:<12}{w.in_levels:>12}{w.ready:>10}{w.held_or_running:>14}{w.total:>10}"
        )
    if p.destinations:
        lines += ["", f"{'destination':<32}{'ready':>10}{'held/running':>14}"]
        for d in p.destinations:
            ready = "-" if d.ready is None else str(d.ready)
            held = "-" if d.held_or_running is None else str(d.held_or_running)
            lines.append(f"{d.destination:<32}{ready:>10}{held:>14}")
    lines += ["", f"precision: {PRECISION}", *(f"note: {n}" for n in p.notes)]
    return "\n".join(lines)
