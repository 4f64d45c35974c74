"""`RunControl`: the bridge between the training loop and the Tolaria server, built so that the
training loop never waits on the network:

- the trainer *pushes* state at boundaries (`update_status`, `publish_metrics`); these are a few
  assignments under a lock, and fan-out to metric subscribers is a non-blocking
  ``loop.call_soon_threadsafe`` into each subscriber's bounded queue (a slow subscriber loses its
  oldest step metrics, never blocks the trainer; epoch metrics are never dropped);
- the server *requests* work (seed table, checkpoint, stop) by putting a request with a
  `concurrent.futures.Future` on a queue; the trainer serves the queue at the next step (or epoch)
  boundary in `after_step` / `after_epoch` and completes the future; the gRPC handler awaits it.
  When the run is not at a boundary for a while (validation), ListSeeds answers from the last
  snapshot instead of waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from esper.v1 import common_pb2, tolaria_pb2

log = logging.getLogger("esper.tolaria.control")

Phase = tolaria_pb2.RunPhase
# Step metrics a subscriber may lag behind before its oldest ones are dropped.
SUBSCRIBER_QUEUE = 1024


@dataclass
class _Request:
    kind: str  # "seeds", "checkpoint", "stop"
    future: concurrent.futures.Future
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    include_steps: bool


class RunControl:
    """Thread-safe bridge between the training loop and the Tolaria servicer (see module doc)."""

    def __init__(self, run_id: str, output_dir: str, total_epochs: int) -> None:
        self._lock = threading.Lock()
        self._status = tolaria_pb2.RunStatus(run_id=run_id, phase=Phase.RUN_PHASE_STARTING, output_dir=output_dir,
                                             total_epochs=total_epochs)
        self._status.start_time.GetCurrentTime()
        self._seeds: list[common_pb2.SeedSlot] = []
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._subscribers: list[_Subscriber] = []
        self._step_subscribers = 0
        self.stop_requested = threading.Event()
        self.stop_reason = ""
        self.finished = threading.Event()

    # ------------------------------------------------------------ trainer side (training thread)

    def mark_started(self) -> None:
        """The run starts now (its server is up, training follows): the status's start time."""
        with self._lock:
            self._status.start_time.GetCurrentTime()

    def update_status(self, **values: Any) -> None:
        """Set RunStatus fields (names as in the proto)."""
        with self._lock:
            for key, value in values.items():
                setattr(self._status, key, value)

    def set_seeds(self, rows: list[common_pb2.SeedSlot]) -> None:
        with self._lock:
            self._seeds = list(rows)

    @property
    def wants_step_metrics(self) -> bool:
        return self._step_subscribers > 0

    def publish_metrics(self, event: common_pb2.MetricsEvent) -> None:
        """Hand a metrics event to every subscriber without blocking (see module doc)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            if event.scope == "step" and not sub.include_steps:
                continue
            try:
                sub.loop.call_soon_threadsafe(_offer, sub.queue, event)
            except RuntimeError:  # the subscriber's loop closed
                self._remove(sub)

    def pending(self) -> bool:
        return not self._requests.empty()

    def serve_requests(self, handlers: dict[str, Callable[[dict[str, Any]], Any]]) -> None:
        """Run queued requests on the training thread (called at a boundary)."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if request.future.done():  # the caller gave up
                continue
            try:
                request.future.set_result(handlers[request.kind](request.args))
            except Exception as exc:  # report the failure to the caller; training goes on
                log.exception("%s request failed", request.kind)
                request.future.set_exception(exc)

    def fail_pending(self, message: str) -> None:
        """Complete every queued request with an error (the run is over)."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            if not request.future.done():
                request.future.set_exception(RuntimeError(message))

    # ------------------------------------------------------------ server side (event loop thread)

    def status(self) -> tolaria_pb2.RunStatus:
        with self._lock:
            copy = tolaria_pb2.RunStatus()
            copy.CopyFrom(self._status)
            return copy

    def seeds_snapshot(self) -> list[common_pb2.SeedSlot]:
        with self._lock:
            return list(self._seeds)

    def submit(self, kind: str, **args: Any) -> concurrent.futures.Future:
        """Queue a request for the training thread; the future completes at its next boundary."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.finished.is_set():
            future.set_exception(RuntimeError("the run has finished; no training step will serve this request"))
            return future
        if kind == "stop":
            self.stop_reason = str(args.get("reason", ""))
            self.stop_requested.set()
        self._requests.put(_Request(kind, future, args))
        return future

    def subscribe(self, include_steps: bool) -> _Subscriber:
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(maxsize=SUBSCRIBER_QUEUE), include_steps)
        with self._lock:
            self._subscribers.append(sub)
            self._step_subscribers += int(include_steps)
        return sub

    def _remove(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
                self._step_subscribers -= int(sub.include_steps)

    unsubscribe = _remove

    def close_streams(self) -> None:
        """End every metrics stream (None is the end-of-stream marker)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            with contextlib.suppress(RuntimeError):  # that subscriber's loop is already closed
                sub.loop.call_soon_threadsafe(_offer, sub.queue, None)


def _offer(q: asyncio.Queue, item: Any) -> None:
    """put_nowait, dropping the oldest queued item when full (never the end marker)."""
    while True:
        try:
            q.put_nowait(item)
            return
        except asyncio.QueueFull:
            try:
                q.get_nowait()
            except asyncio.QueueEmpty:
                return
