"""`PendingKernels`: germinated slots waiting for their compiled kernel. Time and epochs they wait
while a service the kernel needs is down are charged to them, so a restarting service extends
their timeouts instead of ending them."""

from __future__ import annotations

import time
from collections.abc import Callable

from esper.tolaria.adaptation.records import Adaptation


class PendingKernels:
    """The waiting germinations by (layer, seed); see the module docstring."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int], Adaptation] = {}
        self._last_boundary = time.perf_counter()

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, pending: Adaptation) -> None:
        self._waiting[pending.key] = pending

    def discard(self, key: tuple[str, int]) -> None:
        self._waiting.pop(key, None)

    def take(self, kernel_id: str) -> list[Adaptation]:
        """Removes and returns the germinations waiting for `kernel_id` (it arrived or failed)."""
        taken = [p for p in self._waiting.values() if p.kernel_id == kernel_id]
        for pending in taken:
            del self._waiting[pending.key]
        return taken

    def take_overdue(self, limit_s: float) -> list[Adaptation]:
        """Removes and returns those waiting `limit_s` seconds or more since their decision, not
        counting time their services were down."""
        now = time.perf_counter()
        overdue = [p for p in self._waiting.values() if now - p.decided_at - p.outage_s >= limit_s]
        for pending in overdue:
            del self._waiting[pending.key]
        return overdue

    def take_if(self, gone: Callable[[Adaptation], bool]) -> list[Adaptation]:
        """Removes and returns those for which `gone(pending)` (e.g. a rollback freed their slot)."""
        dropped = [p for p in self._waiting.values() if gone(p)]
        for pending in dropped:
            del self._waiting[pending.key]
        return dropped

    def track_outages(self, services_down: Callable[[], bool], epoch: int) -> None:
        """At a step boundary: while `services_down()`, the time since the last boundary (and this
        epoch) is charged to every waiting germination."""
        now = time.perf_counter()
        if self._waiting and services_down():
            for pending in self._waiting.values():
                pending.outage_s += now - self._last_boundary
                pending.outage_epochs.add(epoch)
        self._last_boundary = now

    def grace_epochs(self, key: tuple[str, int]) -> int:
        """Epochs the germination at `key` waited through an outage (0 when it waits for nothing)."""
        pending = self._waiting.get(key)
        return len(pending.outage_epochs) if pending is not None else 0
