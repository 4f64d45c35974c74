"""The Tolaria server inside the training process, and the bridge between it and the training loop.

`RunControl` is the only thing both sides touch, and it is built so that the training loop never
waits on the network:

- the trainer *pushes* state at boundaries (`update_status`, `publish_metrics`); these are a few
  assignments under a lock, and fan-out to metric subscribers is a non-blocking
  ``loop.call_soon_threadsafe`` into each subscriber's bounded queue (a slow subscriber loses its
  oldest step metrics, never blocks the trainer; epoch metrics are never dropped);
- the server *requests* work (seed table, checkpoint, stop) by putting a request with a
  `concurrent.futures.Future` on a queue; the trainer serves the queue at the next step (or epoch)
  boundary in `after_step` / `after_epoch` and completes the future; the gRPC handler awaits it.
  When the run is not at a boundary for a while (validation), ListSeeds answers from the last
  snapshot instead of waiting.

`TolariaServer` runs a `esper.serving.GrpcServer` (health, reflection, error mapping) with the
`services.tolaria` servicer on its own thread and event loop.
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

log = logging.getLogger("esper.tolaria.server")

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


class TolariaServer:
    """The TolariaService gRPC server on a thread of its own (see module doc)."""

    def __init__(self, control: RunControl, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0,
                 auth_token: str | None = None) -> None:
        self.control = control
        self.host = host
        self.port = port
        self.grace_s = grace_s
        self.auth_token = auth_token
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns ``host:port``."""
        self._thread = threading.Thread(target=self._run, name="tolaria-grpc", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the Tolaria server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"the Tolaria server failed to start: {self._error}") from self._error
        return self.address

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() or logged; never kills the trainer
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        from esper.serving import GrpcServer, ServerConfig
        from esper.v1 import tolaria_pb2_grpc
        from services.tolaria.servicer import SERVICE_NAME, TolariaServicer

        server = GrpcServer(ServerConfig(host=self.host, port=self.port, grace_seconds=self.grace_s,
                                         auth_token=self.auth_token))
        server.add_service(SERVICE_NAME, TolariaServicer(self.control),
                           tolaria_pb2_grpc.add_TolariaServiceServicer_to_server)
        self._server = server
        self._shutdown = asyncio.Event()
        self.address = await server.start()
        await server.set_serving()
        self._ready.set()
        await self._shutdown.wait()
        await server.stop()

    def stop(self) -> None:
        """Graceful stop (in-flight calls such as a Stop reply finish within the grace period)."""
        self.control.finished.set()
        self.control.fail_pending("the run has finished")
        self.control.close_streams()
        if self._loop is None or self._server is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(timeout=self.grace_s + 10)
        if self._thread.is_alive():
            log.warning("the Tolaria server did not stop within %.0f s", self.grace_s + 10)


class ServedRunHooks:
    """Trainer boundary hooks that keep a `RunControl` current and serve its requests.

    Per step: a handful of status assignments, step metrics only while someone streams them, and
    queued requests (rare). Stop: the step already finished; write a checkpoint, answer, end the run.
    """

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self._stopping = False

    def _handlers(self, trainer: Any) -> dict[str, Callable[[dict[str, Any]], Any]]:
        def seeds(args: dict[str, Any]) -> list[common_pb2.SeedSlot]:
            rows = live_seed_table(trainer)
            self.control.set_seeds(rows)
            return rows

        def checkpoint(args: dict[str, Any]) -> tuple[str, int]:
            self.control.update_status(phase=Phase.RUN_PHASE_CHECKPOINTING)
            path = trainer.save(best_metric=None)
            self.control.update_status(phase=Phase.RUN_PHASE_TRAINING, last_checkpoint=str(path))
            return str(path), trainer.state.global_step

        def stop(args: dict[str, Any]) -> tuple[str, int]:
            self.control.update_status(phase=Phase.RUN_PHASE_STOPPING)
            trainer.display_line(f"stop requested ({args.get('reason', '')}); checkpointing and ending the run")
            path = trainer.save(best_metric=None)
            self.control.update_status(last_checkpoint=str(path))
            self._stopping = True
            return str(path), trainer.state.global_step

        return {"seeds": seeds, "checkpoint": checkpoint, "stop": stop}

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        control = self.control
        step = trainer.state.global_step
        control.update_status(phase=Phase.RUN_PHASE_TRAINING, epoch=epoch + 1, global_step=step, train_loss=loss)
        if control.wants_step_metrics:
            event = common_pb2.MetricsEvent(run_id=trainer.config.run_name, epoch=epoch + 1, global_step=step,
                                            scope="step", values={"loss": loss})
            event.create_time.GetCurrentTime()
            control.publish_metrics(event)
        if control.pending():
            control.serve_requests(self._handlers(trainer))
        return self._stopping

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        control = self.control
        rows = live_seed_table(trainer)
        control.set_seeds(rows)
        control.update_status(
            epoch=epoch + 1, global_step=trainer.state.global_step, train_loss=record.train_loss,
            val_loss=record.val_loss, val_accuracy=record.val_acc, best_val_accuracy=trainer.state.best_val_acc,
            parameter_count=record.params, active_seeds=trainer.morph.active_count())
        values = {k: float(v) for k, v in record.__dict__.items() if k != "epoch" and isinstance(v, int | float)}
        event = common_pb2.MetricsEvent(run_id=trainer.config.run_name, epoch=epoch + 1,
                                        global_step=trainer.state.global_step, scope="epoch", values=values)
        event.create_time.GetCurrentTime()
        control.publish_metrics(event)
        if control.pending():
            control.serve_requests(self._handlers(trainer))
        return self._stopping


def live_seed_table(trainer: Any) -> list[common_pb2.SeedSlot]:
    """Every seed slot of the run as `SeedSlot` messages (one device read per layer)."""
    rows = []
    for _, layer in trainer.morph.driver.sites:
        rows.extend(row.to_proto() for row in layer.seed_table())
    return rows
