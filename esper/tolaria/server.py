"""The Tolaria server inside the training process: `TolariaServer` runs an `esper.serving.GrpcServer`
(health, reflection, error mapping, the run's auth token and TLS) with the TolariaService servicer
(`esper.tolaria.servicer`) on its own thread and event loop; `ServedRunHooks` are the trainer's
boundary hooks that keep the `RunControl` (`esper.tolaria.control`) current and serve its requests.

Tolaria is the one service with no process of its own (it lives in ``esper-train``), so its
servicer lives here, next to the trainer it serves, not under ``services/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esper.tolaria.control import Phase, RunControl
from esper.tolaria.hooks import BoundaryHook
from esper.v1 import common_pb2

log = logging.getLogger("esper.tolaria.server")

class TolariaServer:
    """The TolariaService gRPC server on a thread of its own (see module doc)."""

    def __init__(self, control: RunControl, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0,
                 auth_token: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, metrics: Any = None) -> None:
        """`metrics`: an `esper.serving.metrics.ServerMetrics` to record RPCs into (esper-train's own
        /metrics endpoint serves them), or None."""
        self.control = control
        self.metrics = metrics
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
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
        from esper.tolaria.servicer import SERVICE_NAME, TolariaServicer
        from esper.v1 import tolaria_pb2_grpc

        server = GrpcServer(ServerConfig(host=self.host, port=self.port, grace_seconds=self.grace_s,
                                         auth_token=self.auth_token,
                                         tls_cert_file=Path(self.tls_cert_file) if self.tls_cert_file else None,
                                         tls_key_file=Path(self.tls_key_file) if self.tls_key_file else None),
                            metrics=self.metrics)
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


class ServedRunHooks(BoundaryHook):
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
