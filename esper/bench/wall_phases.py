"""CPU time per training step, by the lifecycle states of the seeds at that step.

`PhaseClock` is a trainer hook for `esper-bench growth-wall`: it times each optimizer step with
the process CPU clock (less stretched than wall time by other processes on a shared machine) and
files it under the sorted set of lifecycle states of the run's non-dormant seeds ("all dormant"
when there are none). The first step of each epoch is not timed: it carries the epoch boundary's
work (validation, the controller, counterfactual measurements, snapshots), which `boundary_s`
reports with the rest of the run's CPU time (the final test evaluation and checkpoint).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

from esper.tolaria.hooks import BoundaryHook


def phase_of(trainer: Any) -> str:
    """The sorted set of lifecycle states of the run's non-dormant seeds ("all dormant" if none)."""
    states = set()
    for _, layer in trainer.morph.driver.sites:
        for i in range(layer.num_seeds):
            state = layer.state_of(i)
            if state.name != "DORMANT":
                states.add(state.name)
    return ", ".join(sorted(states)) or "all dormant"


class PhaseClock(BoundaryHook):
    """Collects the CPU seconds of each timed step under its phase (see the module doc)."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = defaultdict(list)
        self._last: float | None = None

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        now = time.process_time()
        if self._last is not None:
            self.steps[phase_of(trainer)].append(now - self._last)
        self._last = now
        return False

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        self._last = None
        return False

    def summary(self, total_cpu_s: float) -> dict[str, Any]:
        """{"phases": {phase: {"steps", "median_s", "total_s"}}, "boundary_s": the rest of `total_cpu_s`}."""
        phases = {name: {"steps": len(v), "median_s": statistics.median(v), "total_s": sum(v)}
                  for name, v in sorted(self.steps.items(), key=lambda kv: -sum(kv[1]))}
        return {"phases": phases, "boundary_s": total_cpu_s - sum(p["total_s"] for p in phases.values())}
