"""Prometheus metrics of `esper-train` (`--metrics-port`, `logging.prometheus_port`; off by default).

A trainer hook updates them on the training thread after every step and epoch; the HTTP endpoint
(a daemon thread, `esper.serving.metrics.MetricsEndpoint`) only reads them. Series:

    esper_train_step_seconds             histogram  wall time of an optimizer step (hooks included)
    esper_train_steps_total              counter    optimizer steps taken by this process
    esper_train_samples_total            counter    training samples seen by this process
    esper_train_throughput_samples_per_second gauge  over the last `logging.log_every_steps` steps
    esper_train_loss                     gauge      loss of the last step
    esper_train_global_step / _epoch     gauge      position of the run
    esper_train_val_loss / _val_accuracy gauge      last validation
    esper_train_parameters               gauge      parameters of the (grown) model
    esper_seeds{state}                   gauge      seed slots by lifecycle state
    esper_kernel_cache_*                 hits, misses, evictions (counters), entries, bytes (gauges)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from esper.lifecycle import SeedLifecycleState
from esper.serving.metrics import MetricsEndpoint
from esper.tolaria.hooks import BoundaryHook

STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class TrainerMetrics(BoundaryHook):
    """A trainer hook (`after_step`, `after_epoch`) that keeps the series above up to date.

    `kernel_stats` returns the Kasmina kernel cache's `stats()` dict, or None when the run has no
    cache (services off); it is read on the training thread, never by the HTTP thread.
    """

    def __init__(self, kernel_stats: Callable[[], dict[str, int] | None] = lambda: None,
                 window_steps: int = 10) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram("esper_train_step_seconds", "Wall time of one optimizer step, hooks included",
                                      buckets=STEP_BUCKETS, registry=r)
        self.steps = Counter("esper_train_steps", "Optimizer steps taken by this process", registry=r)
        self.samples = Counter("esper_train_samples", "Training samples seen by this process", registry=r)
        self.throughput = Gauge("esper_train_throughput_samples_per_second",
                                "Training samples per second over the last few steps", registry=r)
        self.loss = Gauge("esper_train_loss", "Training loss of the last step", registry=r)
        self.global_step = Gauge("esper_train_global_step", "Optimizer steps of the run (resumes included)", registry=r)
        self.epoch = Gauge("esper_train_epoch", "Epochs completed", registry=r)
        self.val_loss = Gauge("esper_train_val_loss", "Validation loss of the last epoch", registry=r)
        self.val_acc = Gauge("esper_train_val_accuracy", "Validation accuracy of the last epoch", registry=r)
        self.parameters = Gauge("esper_train_parameters", "Parameters of the model, grown seeds included", registry=r)
        self.seeds = Gauge("esper_seeds", "Seed slots by lifecycle state", ["state"], registry=r)
        self._kernel_stats = kernel_stats
        self._cache: dict[str, int] = {}
        r.register(_KernelCacheCollector(self))
        self._window = max(1, window_steps)
        self._last: float | None = None
        self._window_start = 0.0
        self._window_samples = 0
        self._window_steps = 0
        self.endpoint: MetricsEndpoint | None = None

    def serve(self, host: str, port: int) -> MetricsEndpoint:
        """Starts /metrics on host:port (0 picks a free port)."""
        self.endpoint = MetricsEndpoint(self.registry, host, port)
        return self.endpoint

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

    # ------------------------------------------------------------------ hook protocol

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        now = time.perf_counter()
        samples = _batch_samples(trainer, epoch)
        if self._last is None:  # the first step of the process or of an epoch opens a window
            self._window_start, self._window_samples, self._window_steps = now, 0, 0
        else:
            self.step_seconds.observe(now - self._last)
            self._window_samples += samples  # this step's samples were processed since self._last
            self._window_steps += 1
            if self._window_steps >= self._window:
                self.throughput.set(self._window_samples / max(now - self._window_start, 1e-9))
                self._window_start, self._window_samples, self._window_steps = now, 0, 0
        self._last = now
        self.steps.inc()
        self.samples.inc(samples)
        self.loss.set(loss)
        self.global_step.set(trainer.state.global_step)
        if trainer.state.global_step % self._window == 0:
            self._refresh_state(trainer)
        return False

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        self._last = None  # evaluation time is not a step
        self.epoch.set(record.epoch)
        self.val_loss.set(record.val_loss)
        self.val_acc.set(record.val_acc)
        self.parameters.set(record.params)
        self._refresh_state(trainer)
        return False

    def _refresh_state(self, trainer: Any) -> None:
        counts = {state.name: 0 for state in SeedLifecycleState if state.name != "UNSPECIFIED"}
        for _, layer in trainer.morph.driver.sites:
            for i in range(layer.num_seeds):
                name = layer.state_of(i).name
                counts[name] = counts.get(name, 0) + 1
        for name, n in counts.items():
            self.seeds.labels(name).set(n)
        self.refresh_kernel_cache()

    def refresh_kernel_cache(self) -> None:
        """Copies the kernel cache's counters for the next scrape (on the training thread)."""
        stats = self._kernel_stats()
        self._cache = dict(stats) if stats else {}


def _batch_samples(trainer: Any, epoch: int) -> int:
    """Samples in the step just taken (the last batch of an epoch may be short)."""
    batch = trainer.config.data.batch_size
    in_epoch = trainer.state.global_step - epoch * trainer.steps_per_epoch
    if in_epoch == trainer.steps_per_epoch:
        return len(trainer.data.train) - (trainer.steps_per_epoch - 1) * batch
    return batch


class _KernelCacheCollector:
    def __init__(self, metrics: TrainerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        stats = self._metrics._cache
        if not stats:
            return
        for key in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(f"esper_kernel_cache_{key}", f"Kasmina kernel cache {key}")
            family.add_metric([], stats.get(key, 0))
            yield family
        for key in ("entries", "bytes", "byte_budget", "pinned_entries", "pinned_bytes"):
            family = GaugeMetricFamily(f"esper_kernel_cache_{key}", f"Kasmina kernel cache {key.replace('_', ' ')}")
            family.add_metric([], stats.get(key, 0))
            yield family
