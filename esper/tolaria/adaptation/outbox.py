"""The typed outbox: what the adaptation worker thread hands to the training thread, which
applies it at its next step boundary (the only place the model may change)."""

from __future__ import annotations

import queue
from dataclasses import dataclass

from esper.v1 import common_pb2


@dataclass(frozen=True)
class DecisionsArrived:
    """Tamiyo answered a Decide call."""

    decisions: list[common_pb2.AdaptationDecision]


@dataclass(frozen=True)
class KernelLoaded:
    """A kernel is loaded into the kernel cache; the seeds waiting for it can get it."""

    kernel_id: str


@dataclass(frozen=True)
class KernelFailed:
    """A kernel will not arrive; its seeds are cancelled.

    `deterministic`: the compiler rejected the blueprint (INVALID artifact, a failed preservation
    check): asking again gives the same, so the kernel is not tried again in this run. Otherwise
    (services unavailable past the retries, a worker crash, a timeout, bad bytes) the seeds are
    cancelled as casualties of an outage and a later decision may try the kernel again.
    """

    kernel_id: str
    reason: str
    deterministic: bool = True


@dataclass(frozen=True)
class Note:
    """A line for the run's log, written by the training thread."""

    line: str


OutboxItem = DecisionsArrived | KernelLoaded | KernelFailed | Note


class Outbox:
    """Thread-safe queue of `OutboxItem`s (worker thread puts, training thread drains)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[OutboxItem] = queue.SimpleQueue()

    def put(self, item: OutboxItem) -> None:
        self._queue.put(item)

    def wait(self, timeout: float) -> OutboxItem:
        """The next item, waiting up to `timeout` seconds (queue.Empty after that)."""
        return self._queue.get(timeout=timeout)

    def drain(self) -> list[OutboxItem]:
        """Everything queued now, oldest first."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items
