"""`esper-train --profile [STEPS]`: torch.profiler over STEPS optimizer steps after a warm-up.

Writes a Chrome/Perfetto trace (`<run_dir>/profile/trace.json`, open it in ui.perfetto.dev or
chrome://tracing) and prints the top operators by self time, plus the time spent in Kasmina's own
ops (`esper::*`, the C++ extension) and inside the seeds' modules (their forward, tagged with a
`kasmina.seed <layer>[i]` range for the window) as shares of the profiled wall time.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile, schedule

from esper.tolaria.hooks import BoundaryHook

KASMINA_OP_PREFIX = "esper::"
SEED_RANGE_PREFIX = "kasmina.seed "
TOP_OPS = 15


class StepProfiler(BoundaryHook):
    """A trainer hook: profiles `steps` steps that follow `warmup` steps (at least one, so that
    one-time work such as lazy initialisation stays out of the window)."""

    def __init__(self, run_dir: Path, steps: int, warmup: int, echo: Callable[[str], None] = print) -> None:
        self.out_dir = Path(run_dir) / "profile"
        self.steps = steps
        self.warmup = max(1, warmup)
        self.echo = echo
        self.report: dict[str, Any] | None = None
        self._seen = 0
        self._profiled = 0
        self._prof: profile | None = None
        self._handles: list[Any] = []
        self._t0 = 0.0

    @property
    def active(self) -> bool:
        return self._prof is not None

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        self._seen += 1
        if self._prof is not None:
            self._prof.step()
            self._profiled += 1
            if self._profiled >= self.steps:
                self.finish()
        elif self.report is None and self._seen == self.warmup:
            self._begin(trainer)
        return False

    def _begin(self, trainer: Any) -> None:
        activities = [ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        for name, layer in trainer.morph.driver.sites:
            for key, seed in layer.seeds.items():
                self._tag(seed, f"{SEED_RANGE_PREFIX}{name}[{key}]")
        # One active phase of exactly `steps` steps gives each step a ProfilerStep#N range in the
        # trace; torch warns that the schedule has no warm-up, but ours ran before the window.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            self._prof = profile(activities=activities, record_shapes=False,
                                 schedule=schedule(wait=0, warmup=0, active=self.steps, repeat=1))
            self._prof.__enter__()
        self._t0 = time.perf_counter()

    def _tag(self, module: torch.nn.Module, label: str) -> None:
        ranges: list[Any] = []

        def enter(_module, _inputs):
            ranges.append(record_function(label).__enter__())

        def leave(_module, _inputs, _output):
            if ranges:
                ranges.pop().__exit__(None, None, None)

        self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def finish(self) -> dict[str, Any] | None:
        """Stops profiling (if running), writes the trace, prints and returns the report."""
        if self._prof is None:
            return self.report
        prof, self._prof = self._prof, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window ends when its kernels do
        wall_us = (time.perf_counter() - self._t0) * 1e6
        prof.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(trace))
        self.report = summarise(prof, wall_us, self._profiled, trace)
        (self.out_dir / "summary.json").write_text(json.dumps(self.report, indent=2))
        self.echo(format_report(self.report))
        return self.report


def is_kasmina_op(name: str) -> bool:
    """An op of the extension (`esper::seed_blend`) or the autograd node of its backward."""
    return name.startswith(KASMINA_OP_PREFIX) or "BackwardFor_esper_" in name


def summarise(prof: profile, wall_us: float, steps: int, trace: Path) -> dict[str, Any]:
    """Top operators by self CPU time, Kasmina ops and the seeds' share of the profiled window."""
    averages = prof.key_averages()
    ops = []
    kasmina_us = 0.0
    seeds_us = 0.0
    for event in averages:
        if event.key.startswith(SEED_RANGE_PREFIX):
            seeds_us += event.cpu_time_total
            continue
        if event.key.startswith("ProfilerStep#"):
            continue
        if is_kasmina_op(event.key):
            kasmina_us += event.self_cpu_time_total
        ops.append({"name": event.key, "calls": event.count, "self_cpu_us": event.self_cpu_time_total,
                    "cpu_total_us": event.cpu_time_total,
                    "self_device_us": getattr(event, "self_device_time_total", 0.0)})
    ops.sort(key=lambda o: o["self_cpu_us"], reverse=True)
    total_self = sum(o["self_cpu_us"] for o in ops) or 1.0
    return {
        "steps": steps,
        "wall_ms": wall_us / 1e3,
        "step_ms": wall_us / 1e3 / max(steps, 1),
        "trace": str(trace),
        "kasmina_ops_us": kasmina_us,
        "kasmina_ops_share": kasmina_us / max(wall_us, 1.0),
        "seeds_us": seeds_us,
        "seeds_share": seeds_us / max(wall_us, 1.0),
        "top_ops": [{**o, "self_share": o["self_cpu_us"] / total_self} for o in ops[:TOP_OPS]],
    }


def format_report(report: dict[str, Any]) -> str:
    """The printed table: top operators by self CPU time, then the Kasmina and seed lines."""
    lines = [f"profile: {report['steps']} steps, {report['wall_ms']:.1f} ms wall ({report['step_ms']:.2f} ms/step); "
             f"trace {report['trace']}",
             f"  {'operator':<44} {'calls':>7} {'self CPU ms':>12} {'self %':>7}"]
    for op in report["top_ops"]:
        lines.append(f"  {op['name'][:44]:<44} {op['calls']:>7} {op['self_cpu_us'] / 1e3:>12.3f} "
                     f"{100 * op['self_share']:>6.1f}%")
    lines.append(f"  Kasmina ops (esper::*, forward and backward): {report['kasmina_ops_us'] / 1e3:.3f} ms self, "
                 f"{100 * report['kasmina_ops_share']:.1f}% of wall")
    lines.append(f"  seeds (forward of the seed modules): {report['seeds_us'] / 1e3:.3f} ms, "
                 f"{100 * report['seeds_share']:.1f}% of wall")
    return "\n".join(lines)
