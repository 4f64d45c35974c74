"""`StepTimer`: the wall time between step boundaries, labelled with the adaptation work that ran
meanwhile ("compile" in Tezzeret, "load" in this process, or ""), for the run's step-time stats."""

from __future__ import annotations

import time
from collections.abc import Callable


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
