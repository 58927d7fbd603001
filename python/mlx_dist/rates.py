"""Per-device rates (busy fraction, tokens/s, ms per step) from the
difference between two successive snapshots of the workers' cumulative
counters, as ``/cluster/status`` reports them; shared by ``/metrics`` and
``mlx-dist top``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counters:
    """One device's cumulative counters at one moment."""

    at: float
    busy_micros: int
    uptime_micros: int
    tokens: int
    steps: int


class Rates:
    """Per-device rates between the last two snapshots."""

    def __init__(self) -> None:
        self.last: dict[str, Counters] = {}

    def update(self, status: dict, now: float) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for d in status.get("devices", []):
            info = d.get("info") or {}
            key = str(d.get("address", d.get("name")))
            if "uptime_micros" not in info:
                continue
            figures = info.get("engine") or {}
            c = Counters(
                now,
                int(figures.get("busy_micros", 0)),
                int(info.get("uptime_micros", 0)),
                int(figures.get("tokens_processed", 0)),
                int(figures.get("steps", 0)),
            )
            prev = self.last.get(key)
            self.last[key] = c
            # A restarted worker's counters start again: no rate this time.
            if prev is None or c.uptime_micros <= prev.uptime_micros or c.tokens < prev.tokens:
                continue
            up = c.uptime_micros - prev.uptime_micros
            steps = c.steps - prev.steps
            out[key] = {
                "busy": min(1.0, (c.busy_micros - prev.busy_micros) / up),
                "tokens_per_s": (c.tokens - prev.tokens) / max(c.at - prev.at, 1e-6),
                "ms_per_step": (c.busy_micros - prev.busy_micros) / steps / 1e3 if steps else None,
            }
        return out
