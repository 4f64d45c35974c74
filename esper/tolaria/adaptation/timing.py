"""`StepTimer`: the wall time between step boundaries, labelled with the adaptation work that ran
meanwhile ("compile" in Tezzeret, "load" in this process, or ""), and the run's step-time stats by phase."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


class StepTimer:
    """Call `boundary(step)` at every step boundary and `pause()` before validation."""

    def __init__(self, phase: Callable[[], str]):
        self._phase = phase
        # (seconds between step boundaries, what ran meanwhile, step)
        self.samples: list[tuple[float, str, int]] = []
        self.last_step_s = 0.0
        self._last_at: float | None = None
        self._interval_phase = ""

    def boundary(self, step: int) -> None:
        """Close the interval that ends now (one training step plus any boundary work)."""
        now = time.perf_counter()
        if self._last_at is not None:
            phase = self._phase()
            if phase == "compile" and self._interval_phase != "compile":
                phase = ""  # the compile began inside this interval (the germination step itself)
            elif not phase and self._interval_phase == "load":
                phase = "load"  # the load ended inside this interval
            self.last_step_s = now - self._last_at
            self.samples.append((self.last_step_s, phase, step))
        self._last_at = now

    def opened(self) -> None:
        """The next interval begins (after this boundary's own work): note what runs in it."""
        self._interval_phase = self._phase()

    def pause(self) -> None:
        """The next interval would include validation: do not time it."""
        self._last_at = None


def step_time_stats(samples: list[tuple[float, str, int]]) -> dict[str, Any]:
    """Median, p95 and slowest step (ms): overall, with no kernel in flight, while Tezzeret compiled
    a kernel for the run, and while the trainer downloaded and loaded one; the ten slowest steps."""
    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {"n": 0}
        ordered = sorted(values)
        return {"n": len(values), "median_ms": statistics.median(values) * 1000,
                "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000,
                "max_ms": ordered[-1] * 1000}

    everything = [dt for dt, _, _ in samples]
    out: dict[str, Any] = {"all": stats(everything)}
    for key, phase in (("no_adaptation", ""), ("during_compile", "compile"), ("during_load", "load")):
        values = [dt for dt, p, _ in samples if p == phase]
        out[key] = stats(values)
        if everything and values and key != "no_adaptation":
            out[f"max_{key}_over_median"] = max(values) / statistics.median(everything)
    out["slowest"] = [{"step": step, "ms": dt * 1000, "phase": phase or "none"}
                      for dt, phase, step in sorted(samples, reverse=True)[:10]]
    return out
