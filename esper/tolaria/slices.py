"""Run GIL-heavy background work in slices that the training thread hands out between steps.

Loading a compiled kernel (`torch.export.load`, then a first forward/backward) is mostly Python:
it holds the GIL. Left to CPython's switching, a loader thread takes the GIL each time a training
op releases it, and the training thread then waits for it at every op: on this 2-core machine a
2.5 ms step took 7-9 ms while a kernel loaded. `StepSlices` makes the loader take turns instead:

- `run(fn)` (background thread) runs `fn` with a trace function on that thread only; every 32nd
  Python call in it checks the clock and, once the current slice is used up, parks the thread on a
  condition variable (which releases the GIL) until the next slice;
- `grant(seconds)` (training thread, at a step boundary) opens a slice and waits, GIL released,
  until the background work parks again or ends (at most twice the slice plus 2 ms).

So the background work runs only between steps, for `share` of the last step's duration at a
time: a step boundary grows by at most that share (plus the work of one C call that cannot be
interrupted), and the work still finishes within (its own time / share) of training. `release()`
lets it run freely (shutdown, or when no training step will come).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_CHECK_EVERY = 32  # Python calls between clock checks in the background thread


class StepSlices:
    """See the module docstring. One instance serves any number of background threads."""

    def __init__(self, share: float = 0.25, min_slice_s: float = 0.0001, max_slice_s: float = 0.01):
        if not 0 < share <= 10:
            raise ValueError(f"share must be in (0, 10], got {share}")
        self.share = share
        self.min_slice_s = min_slice_s
        self.max_slice_s = max_slice_s
        self._cond = threading.Condition()
        self._deadline = 0.0
        self._grant = 0  # id of the latest slice
        self._parked_in = -1  # slice id in which a background thread last parked
        self._running = 0
        self._free = False
        self.slices = 0  # slices granted while work was waiting (for reports and tests)
        self.waited_s: list[float] = []  # how long each grant held the training thread

    @property
    def busy(self) -> bool:
        return self._running > 0

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Background thread: `fn(*args)`, executed only inside granted slices."""
        calls = 0

        def tracer(frame, event, arg):
            nonlocal calls
            calls += 1
            if calls % _CHECK_EVERY == 0 and not self._free and time.perf_counter() >= self._deadline:
                self._park()
            return None  # no line tracing inside the frame

        with self._cond:
            self._running += 1
        previous = sys.gettrace()
        try:
            self._park()  # wait for the first slice
            sys.settrace(tracer)
            return fn(*args)
        finally:
            sys.settrace(previous)
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _park(self) -> None:
        with self._cond:
            self._parked_in = self._grant
            self._cond.notify_all()
            while not self._free and time.perf_counter() >= self._deadline:
                self._cond.wait()

    def grant(self, last_step_s: float) -> float:
        """Training thread: a slice of `share` x `last_step_s` (clamped); returns the seconds waited."""
        if self._running == 0 or self._free:
            return 0.0
        seconds = min(self.max_slice_s, max(self.min_slice_s, self.share * last_step_s))
        started = time.perf_counter()
        with self._cond:
            if self._running == 0:
                return 0.0
            self._grant += 1
            grant = self._grant
            self.slices += 1
            self._deadline = started + seconds
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._parked_in == grant or self._running == 0,
                                timeout=2 * seconds + 0.002)
            self._deadline = 0.0  # a slice ends when the training thread moves on
        waited = time.perf_counter() - started
        self.waited_s.append(waited)
        return waited

    def release(self) -> None:
        """Let background work run without slices from now on (shutdown)."""
        with self._cond:
            self._free = True
            self._cond.notify_all()
