"""The run's monitors: the profiler (``--profile``) and the Prometheus endpoint
(``--metrics-port``), trainer hooks built before the trainer and started with the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from esper.tolaria.config import LoggingConfig


class Monitors:
    """The profiler (--profile) and the Prometheus endpoint (--metrics-port) of a run: trainer
    hooks built before the trainer, started (`start`) once the run directory exists."""

    def __init__(self, settings: LoggingConfig | None, run_dir: Path, services: Callable[[], Any]) -> None:
        """`settings` None: no monitors (ranks other than 0). `services()` is the run's `RunServices`
        (the kernel cache of its remote controller is scraped)."""
        self.settings = settings
        self.hooks: list[Any] = []
        self.server_metrics = None
        self.profiler = None
        self.metrics = None
        if settings is None:
            return
        if settings.profile_steps > 0:
            from esper.tolaria.profiling import StepProfiler

            self.profiler = StepProfiler(run_dir, settings.profile_steps, settings.profile_warmup_steps)
            self.hooks.append(self.profiler)
        if settings.prometheus_port >= 0:
            from esper.serving.metrics import ServerMetrics
            from esper.tolaria.trainer_metrics import TrainerMetrics

            def kernel_stats():
                remote = getattr(services(), "remote", None)
                return remote.kernels.stats() if remote is not None else None

            self.metrics = TrainerMetrics(kernel_stats, window_steps=settings.log_every_steps)
            self.server_metrics = ServerMetrics(registry=self.metrics.registry)  # TolariaService's RPCs
            self.hooks.append(self.metrics)

    def start(self) -> list[Callable[[], object]]:
        """Serves the metrics endpoint; returns what to call after training (a profile window the
        run cut short is written then)."""
        closers: list[Callable[[], object]] = []
        if self.profiler is not None:
            closers.append(self.profiler.finish)
        if self.metrics is not None and self.settings is not None:
            endpoint = self.metrics.serve(self.settings.prometheus_host, self.settings.prometheus_port)
            print(f"metrics: {endpoint.url}", flush=True)
            closers.append(self.metrics.close)
        return closers
