"""Asynchronous adaptation through the services: `RemoteController`.

It stands where the in-process `esper.tamiyo.Controller` stands (``morph.controller``; same
`decide` / `state_dict` / `load_state_dict`), but nothing it does waits on the network inside a
training step. All gRPC work runs on one background thread with its own asyncio loop; the
training thread only hands it work (`asyncio.run_coroutine_threadsafe`, never awaited) and drains
a queue of results at step boundaries (`after_step`).

The cycle of one adaptation:

1. epoch boundary: `decide(graph)` sends the `ModelGraphState` to Tamiyo (deadline
   ``services.decision_timeout_s``) and returns no decision at once; the reply is applied at the
   next step boundary (a decision for a slot that is no longer free is dropped with a note);
2. a GERMINATE decision: the kernel id of (blueprint, seed chunk shape, device, dtype) is looked
   up in the `KernelCache` (warm: the seed gets its module at once); else the slot goes
   GERMINATED (awaiting its kernel) and the worker looks the kernel up in Urza and, if absent,
   asks Tezzeret to compile it; training goes on;
3. the kernel-ready event on Oona (``esper.kernel.ready``; polling the compile job covers a
   missed event and reports failures) makes the worker download the artifact from Urza, verify
   its SHA-256, keep a copy in the run directory (``kernels/<kernel id>.pt2``, for resume) and
   load it with `torch.export.load` (no pickle) into the Kasmina `KernelCache`;
4. next step boundary: the seed gets a fresh copy of the loaded module (`attach_kernel`) and goes
   on through its lifecycle; its parameters join the optimizer;
5. a compile that fails cancels the seed with the reason (GERMINATED seeds cannot be culled: they
   never touched the host) and that kernel id is not tried again in this run;
6. lifecycle transitions (``esper.lifecycle``), decisions (``esper.decisions``) and epoch metrics
   (``esper.metrics``) are published on Oona; the outcome of every germination (fossilized,
   culled, cancelled, rolled back, compile failed) is reported to Tamiyo as a `FieldReport`.

Degradation: each service has a link with exponential backoff. A failed call marks the service
down (a warning, ``adaptation_paused`` with the reason); until its backoff expires no call is
made to it (so a dead service costs nothing), then a fresh channel is tried; when it answers,
adaptation resumes (an info line). Outcome reports and publishes wait in bounded queues until
their service is back. Pending kernels are retried until they arrive or their seed is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import logging
import os
import queue
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from esper.kasmina.blueprints import BlueprintError
from esper.kasmina.growth.errors import GrowthError
from esper.kasmina.lifecycle import ACTIVE_STATES, IllegalTransitionError
from esper.lifecycle import SeedLifecycleState as S
from esper.serving import ChannelConfig, open_aio_channel
from esper.tolaria.slices import StepSlices
from esper.v1 import (
    common_pb2,
    oona_pb2,
    oona_pb2_grpc,
    tamiyo_pb2,
    tamiyo_pb2_grpc,
    tezzeret_pb2,
    tezzeret_pb2_grpc,
    urza_pb2,
    urza_pb2_grpc,
)

log = logging.getLogger("esper.tolaria.remote")

KERNEL_READY_TOPIC = "esper.kernel.ready"
LIFECYCLE_TOPIC = "esper.lifecycle"
DECISIONS_TOPIC = "esper.decisions"
METRICS_TOPIC = "esper.metrics"
PROTO_CONTENT = "application/x-protobuf; type=esper.v1.{}"
# Publishes and reports kept while their service is down (oldest publishes dropped beyond this).
MAX_BACKLOG = 10_000
KERNEL_CACHE_BYTES = 256 << 20
# Share of a training step's duration a kernel load may run for at each step boundary (StepSlices).
LOAD_SHARE = 0.25
# GIL switch interval while the controller runs (CPython's default is 5 ms): the longest the
# training thread waits for the GIL when the adaptation thread is busy with Python work.
SWITCH_INTERVAL_S = 0.0005
OUTCOMES = {
    S.FOSSILIZED: common_pb2.ADAPTATION_OUTCOME_FOSSILIZED,
    S.CULLED: common_pb2.ADAPTATION_OUTCOME_CULLED,
    S.ROLLED_BACK: common_pb2.ADAPTATION_OUTCOME_ROLLED_BACK,
}
_DEVICE_TYPES = {"cpu": common_pb2.DEVICE_TYPE_CPU, "cuda": common_pb2.DEVICE_TYPE_CUDA}
_DTYPES = {torch.float32: common_pb2.D_TYPE_FLOAT32, torch.float64: common_pb2.D_TYPE_FLOAT64,
           torch.float16: common_pb2.D_TYPE_FLOAT16, torch.bfloat16: common_pb2.D_TYPE_BFLOAT16}
# Codes that mean "the service is not there or too slow" (anything else is an answer).
_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})


class CompileFailed(RuntimeError):
    """Tezzeret reported the kernel INVALID, failed or timed out."""


@dataclass
class RemoteSettings:
    """What the controller needs from ``services`` in the run config (see ServicesConfig)."""

    addresses: dict[str, str]
    decision_timeout_s: float = 2.0
    call_timeout_s: float = 5.0
    compile_timeout_s: float = 120.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 8.0
    poll_s: float = 2.0
    auth_token: str | None = None


@dataclass
class PendingSeed:
    """A germinated slot waiting for its kernel (and, until its outcome, an adaptation to report)."""

    layer: str
    seed: int
    kernel_id: str
    blueprint_id: str
    decision: common_pb2.AdaptationDecision
    decided_at: float
    decided_step: int
    telemetry_before: common_pb2.SeedTelemetry = field(default_factory=common_pb2.SeedTelemetry)
    signals_before: common_pb2.TrainingSignals = field(default_factory=common_pb2.TrainingSignals)
    path: str = "cold"


class ServiceLink:
    """One service: its channel, whether it is up, and the backoff before the next attempt."""

    def __init__(self, name: str, address: str, settings: RemoteSettings, on_change: Callable[[], None]):
        self.name = name
        self.address = address
        self.settings = settings
        self.channel: grpc.aio.Channel | None = None
        self.down_reason = ""
        self.next_try = 0.0
        self.backoff = settings.retry_initial_s
        self.failures = 0
        self.outages = 0
        self._on_change = on_change

    def open(self) -> grpc.aio.Channel:
        if self.channel is None:
            self.channel = open_aio_channel(ChannelConfig(self.address, auth_token=self.settings.auth_token))
        return self.channel

    @property
    def up(self) -> bool:
        return not self.down_reason

    def may_call(self) -> bool:
        return self.up or time.monotonic() >= self.next_try

    async def failed(self, err: BaseException) -> None:
        """Mark the service down (warn on the first failure) and back off before the next attempt."""
        reason = f"{self.name} at {self.address} unreachable: {_describe(err)}"
        self.failures += 1
        if self.up:
            self.outages += 1
            self.backoff = self.settings.retry_initial_s
            log.warning("%s; training continues without adaptation, retrying with backoff", reason)
        else:
            self.backoff = min(self.settings.retry_max_s, self.backoff * 2)
        self.down_reason = reason
        self.next_try = time.monotonic() + self.backoff
        # A fresh channel at the next attempt connects at once (a failed channel's own reconnect
        # backoff grows to minutes).
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await channel.close()
        self._on_change()

    def ok(self) -> None:
        if not self.up:
            log.warning("%s at %s is back; adaptation resumes", self.name, self.address)
            self.down_reason = ""
            self._on_change()
        self.backoff = self.settings.retry_initial_s

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


def _is_down(err: BaseException) -> bool:
    return isinstance(err, grpc.aio.AioRpcError) and err.code() in _DOWN_CODES


class KernelStore:
    """Loaded kernels: the Kasmina `KernelCache` (bytes accounted) plus the verified bytes on disk."""

    def __init__(self, directory: Path, byte_budget: int = KERNEL_CACHE_BYTES):
        from esper.kasmina import KernelCache

        self.directory = Path(directory)
        self.cache = KernelCache(byte_budget)

    def key(self, kernel_id: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str, str]:
        from esper.kasmina import cache_key

        return cache_key(kernel_id, device, dtype)

    def get(self, kernel_id: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
        return self.cache.get(*self.key(kernel_id, device, dtype))

    def put(self, kernel_id: str, device: torch.device, dtype: torch.dtype, module: torch.nn.Module,
            nbytes: int) -> None:
        self.cache.put(*self.key(kernel_id, device, dtype), module, nbytes)

    def path(self, kernel_id: str) -> Path:
        # kernel ids are ``<blueprint>-v<n>-<hex>`` made by us (kernel_id_for); refuse anything else.
        if not kernel_id or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789_-" for c in kernel_id):
            raise ValueError(f"kernel id {kernel_id!r} is not a kernel id made by esper.tezzeret.kernel_id_for")
        return self.directory / f"{kernel_id}.pt2"

    def save_bytes(self, kernel_id: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(kernel_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def load_local(self, kernel_id: str) -> torch.nn.Module | None:
        """The module from this run's own verified copy, or None."""
        from esper.tezzeret import load_kernel_artifact

        try:
            data = self.path(kernel_id).read_bytes()
        except OSError:
            return None
        return load_kernel_artifact(data)

    def stats(self) -> dict[str, int]:
        return dict(self.cache.stats())


def _flatten_keys(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "graph.")]:
        state_dict[prefix + key[len(prefix) + len("graph."):]] = state_dict.pop(key)


def _nest_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "graph.")]:
        state_dict[prefix + "graph." + key[len(prefix):]] = state_dict.pop(key)


def compiled_seed(module: torch.nn.Module, blueprint_id: str) -> torch.nn.Module:
    """A loaded artifact (`esper.tezzeret.ExportedSeed`) made checkpoint-compatible with built seeds.

    Its parameters are saved under the names the Kasmina builder uses (no ``graph.`` level), so a
    checkpoint of a seed that ran a compiled kernel loads anywhere (a resume in any services mode,
    `esper-export`); `blueprint_id` tells Kasmina the module already fits its spec.
    """
    module.blueprint_id = blueprint_id
    module._register_state_dict_hook(_flatten_keys)
    module._register_load_state_dict_pre_hook(_nest_keys)
    return module


class RemoteController:
    """Adaptation through Tamiyo, Urza, Tezzeret and Oona; see the module docstring."""

    def __init__(self, morph: Any, settings: RemoteSettings, run_dir: Path, *,
                 echo: Callable[[str], None] | None = None):
        self.morph = morph
        self.settings = settings
        self.run_id = morph.run_id
        self.kernels = KernelStore(Path(run_dir) / "kernels")
        self.echo = echo or (lambda line: log.info(line))
        self._outbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._pending: dict[tuple[str, int], PendingSeed] = {}
        self._adaptations: dict[tuple[str, int], PendingSeed] = {}
        self._failed_kernels: dict[str, str] = {}
        self._fetching: set[str] = set()
        self._shapes: dict[str, list[int]] = {}
        self._loaded: dict[str, tuple[torch.nn.Module, str]] = {}
        # Kernel loads hold the GIL: they run in slices the training thread grants between steps.
        self._slices = StepSlices(share=LOAD_SHARE)
        self._last_step_s = 0.0
        self._spares: dict[str, torch.nn.Module] = {}
        self.germinations: list[dict[str, Any]] = []
        self.decision_latencies_ms: list[float] = []
        # (seconds between step boundaries, what ran meanwhile: "compile", "load" or "", step)
        self.step_times: list[tuple[float, str, int]] = []
        # Set by the worker thread, read by the training thread (plain ints: no lock needed).
        self._compiles_in_flight = 0
        self._loads_in_flight = 0
        self._last_step_at: float | None = None
        self._interval_phase = ""
        self._switch_interval = sys.getswitchinterval()
        self.events: list[dict[str, Any]] = []
        self._decide_future: concurrent.futures.Future | None = None
        self._ready_waiters: dict[str, asyncio.Event] = {}
        self._last_graph_nodes: dict[tuple[str, int], common_pb2.GraphNode] = {}
        self._last_signals = common_pb2.TrainingSignals()
        self._step = 0
        self._status_listener: Callable[[bool, str], None] | None = None
        self._loop = asyncio.new_event_loop()
        self._links: dict[str, ServiceLink] = {}
        self._backlog: dict[str, deque] = {"oona": deque(maxlen=MAX_BACKLOG), "tamiyo": deque(maxlen=MAX_BACKLOG)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for _, layer in morph.driver.sites:
            layer.add_listener(self._on_lifecycle)
        morph.germinate_hook = self._germinate

    def connect(self, addresses: dict[str, str]) -> None:
        """Start the worker thread with links to the services at `addresses` (no call waits here).

        First the kernel loader is warmed up (`esper.tezzeret.warm_up_loader`, about a second,
        before training starts), so that loading a kernel later holds the GIL for milliseconds.
        """
        from esper.tezzeret.compiler import warm_up_loader

        started = time.perf_counter()
        full = warm_up_loader()
        self._note(f"kernel loader warmed up in {time.perf_counter() - started:.2f} s"
                   + ("" if full else " (imports only: esper/tezzeret/warmup.pt2 is missing; run make build)"))
        self.settings.addresses = dict(addresses)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        self._links = {name: ServiceLink(name, address, self.settings, self._links_changed)
                       for name, address in addresses.items()}
        self._thread = threading.Thread(target=self._run_loop, name="esper-adaptation", daemon=True)
        self._thread.start()
        self._submit(self._kernel_ready_listener())
        self._submit(self._drain_backlogs())

    def outages(self) -> dict[str, int]:
        """Times each service went down during the run."""
        return {name: link.outages for name, link in self._links.items()}

    # ------------------------------------------------------------------ threading

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what can be flushed within `timeout`, then stop the worker thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._slices.release()  # no more steps will grant slices
        if self._thread is None:
            return

        async def shutdown() -> None:
            deadline = time.monotonic() + timeout
            while any(self._backlog.values()) and time.monotonic() < deadline and any(
                    self._links[n].up for n in self._backlog if n in self._links):
                await asyncio.sleep(0.05)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self._links.values():
                await link.close()

        try:
            self._submit(shutdown()).result(timeout + 5)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("adaptation worker did not shut down cleanly: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        sys.setswitchinterval(self._switch_interval)

    def on_status_change(self, listener: Callable[[bool, str], None]) -> None:
        self._status_listener = listener

    def _links_changed(self) -> None:
        if self._status_listener is not None:
            paused, reason = self.paused()
            self._status_listener(paused, reason)

    def paused(self) -> tuple[bool, str]:
        """(adaptation paused, why): a service the cycle needs is down."""
        down = [link.down_reason for link in self._links.values() if not link.up]
        return bool(down), "; ".join(down)

    # ------------------------------------------------------------------ controller interface

    def decide(self, state: common_pb2.ModelGraphState) -> list[common_pb2.AdaptationDecision]:
        """Send the graph to Tamiyo in the background; decisions are applied at the next step boundary."""
        state.signals.initial_flops_per_sample = float(self.morph.flops_initial)
        if self._thread is None:
            return []
        if self._decide_future is not None and not self._decide_future.done():
            self._note("decision skipped: the previous Decide call has not returned yet")
            return []
        graph = common_pb2.ModelGraphState()
        graph.CopyFrom(state)
        self._decide_future = self._submit(self._decide(graph, time.perf_counter()))
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: failed kernels and the decisions behind in-flight adaptations."""
        return {
            "failed_kernels": dict(self._failed_kernels),
            "adaptations": [
                {"layer": p.layer, "seed": p.seed, "kernel_id": p.kernel_id, "blueprint_id": p.blueprint_id,
                 "decision": p.decision.SerializeToString().hex(),
                 "telemetry_before": p.telemetry_before.SerializeToString().hex(),
                 "signals_before": p.signals_before.SerializeToString().hex(), "path": p.path,
                 "decided_step": p.decided_step}
                for p in self._adaptations.values()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._failed_kernels = dict(state.get("failed_kernels", {}))
        self._adaptations = {}
        for a in state.get("adaptations", []):
            p = PendingSeed(a["layer"], int(a["seed"]), a["kernel_id"], a["blueprint_id"],
                            common_pb2.AdaptationDecision.FromString(bytes.fromhex(a["decision"])),
                            time.perf_counter(), int(a["decided_step"]),
                            common_pb2.SeedTelemetry.FromString(bytes.fromhex(a["telemetry_before"])),
                            common_pb2.TrainingSignals.FromString(bytes.fromhex(a["signals_before"])), a["path"])
            self._adaptations[(p.layer, p.seed)] = p

    # ------------------------------------------------------------------ resume support

    def before_restore(self, payload: dict[str, Any]) -> None:
        """Before a checkpoint is loaded: seeds that ran a compiled kernel get that kernel back.

        The module comes from this run's verified copy of the artifact (``kernels/``); without the
        copy Kasmina builds the seed from its blueprint, which loads the same weights.
        """
        from esper.kasmina.layer import KasminaLayer

        model_state = payload["model"]
        for prefix_name, module in self.morph.model.named_modules():
            if not isinstance(module, KasminaLayer):
                continue
            prefix = f"{prefix_name}." if prefix_name else ""
            extra = model_state.get(prefix + "_extra_state") or {}
            states = model_state.get(prefix + "table.state")
            for index, kernel_id in (extra.get("kernel_ids") or {}).items():
                if states is None or not kernel_id or S(int(states[int(index)])) not in ACTIVE_STATES:
                    continue
                try:
                    loaded = self.kernels.load_local(kernel_id)
                except ValueError:
                    loaded = None
                if loaded is None:
                    continue
                from google.protobuf import json_format

                spec = json_format.Parse(extra["specs"][index], common_pb2.BlueprintSpec())
                module.seeds[str(index)] = compiled_seed(loaded.to(self.morph.device), spec.blueprint_id)

    def resume_pending(self, global_step: int) -> int:
        """After a resume: fetch (or compile) the kernels of slots still GERMINATED; their count."""
        self._step = global_step
        count = 0
        for name, layer in self.morph.driver.sites:
            for i in range(layer.num_seeds):
                if layer.state_of(i) != S.GERMINATED:
                    continue
                record = self._adaptations.get((name, i))
                spec = layer.blueprint_of(i)
                if spec is None:
                    continue
                shape, device, dtype = self._kernel_target(name, layer)
                kernel_id = layer.seed_table()[i].kernel_id or self._kernel_id(spec, shape, device, dtype)
                decision = record.decision if record else common_pb2.AdaptationDecision(
                    layer_name=name, seed_index=i, blueprint_id=spec.blueprint_id,
                    action=common_pb2.DECISION_ACTION_GERMINATE)
                pending = PendingSeed(name, i, kernel_id, spec.blueprint_id, decision, time.perf_counter(),
                                      self._step, record.telemetry_before if record else common_pb2.SeedTelemetry(),
                                      record.signals_before if record else common_pb2.TrainingSignals())
                self._pending[(name, i)] = pending
                self._adaptations[(name, i)] = pending
                self._request_kernel(kernel_id, spec, shape, device, dtype)
                count += 1
        if count:
            self._note(f"resume: {count} germinated seed(s) waiting for their kernels again")
        return count

    # ------------------------------------------------------------------ training-thread hooks

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        now = time.perf_counter()
        if self._last_step_at is not None:
            # Wall time of one step (plus any boundary work), and what adaptation work ran meanwhile.
            phase = self._phase()
            if phase == "compile" and self._interval_phase != "compile":
                phase = ""  # the compile began inside this interval (the germination step itself)
            elif not phase and self._interval_phase == "load":
                phase = "load"  # the load ended inside this interval
            self._last_step_s = now - self._last_step_at
            self.step_times.append((self._last_step_s, phase, trainer.state.global_step))
        self._last_step_at = now
        self._drain(trainer, epoch)
        if self._last_step_s:
            self._slices.grant(self._last_step_s)  # a kernel load's turn, if one is waiting
        self._interval_phase = self._phase()
        return False

    def _phase(self) -> str:
        """What adaptation work runs now: "compile" (in Tezzeret), "load" (in this process) or ""."""
        return "load" if self._loads_in_flight else "compile" if self._compiles_in_flight else ""

    def _drain(self, trainer: Any, epoch: int) -> None:
        self._step = trainer.state.global_step
        if self._outbox.empty():
            return
        changed = False
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                break
            kind = item[0]
            if kind == "decisions":
                changed |= self._apply_decisions(item[1], epoch)
            elif kind == "kernel":
                changed |= self._attach(item[1], epoch)
            elif kind == "compile_failed":
                self._compile_failed(item[1], item[2])
            elif kind == "note":
                self._note(item[1])
        if changed:
            self._sync_optimizer(trainer)

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        self._last_step_at = None  # the next interval would include validation
        self._drain(trainer, epoch)
        values = {k: float(v) for k, v in record.__dict__.items() if k != "epoch" and isinstance(v, int | float)}
        event = common_pb2.MetricsEvent(run_id=self.run_id, epoch=epoch + 1, global_step=trainer.state.global_step,
                                        scope="epoch", values=values)
        event.create_time.GetCurrentTime()
        self._publish(METRICS_TOPIC, "MetricsEvent", event, key=self.run_id)
        return False

    def _sync_optimizer(self, trainer: Any) -> None:
        """New seed modules join the optimizer (one group each), removed ones leave it."""
        from esper.tolaria.schedule import add_param_group, remove_param_group

        live = dict(self.morph.param_groups())
        names = [g.get("name") for g in trainer.optimizer.param_groups]
        for name in names[1:]:
            if name not in live:
                remove_param_group(trainer.optimizer, name)
        for name, params in live.items():
            if name not in names:
                add_param_group(trainer.optimizer, params, name, trainer.config.optim.lr)

    def _note(self, line: str) -> None:
        self.events.append({"step": self._step, "t": time.time(), "note": line})
        self.echo(f"  [services] {line}")

    # ------------------------------------------------------------------ decisions and kernels

    def _apply_decisions(self, decisions: list[common_pb2.AdaptationDecision], epoch: int) -> bool:
        before = len(self.morph.param_group_names())
        for d in decisions:
            if d.action == common_pb2.DECISION_ACTION_WAIT:
                continue
            try:
                layer = self.morph.driver.site(d.layer_name)
            except KeyError:
                self._note(f"decision {d.decision_id[:8]} names unknown layer {d.layer_name!r}; dropped")
                continue
            if d.action == common_pb2.DECISION_ACTION_GERMINATE:
                if layer.state_of(d.seed_index) != S.DORMANT:
                    self._note(f"decision {d.decision_id[:8]}: {d.layer_name}[{d.seed_index}] is "
                               f"{layer.state_of(d.seed_index).name} by now; dropped")
                    continue
                # Width and depth seeds are built in-process: no blueprint, nothing to compile.
                structural = d.growth_mode in (common_pb2.GROWTH_MODE_WIDTH, common_pb2.GROWTH_MODE_DEPTH)
                failed = "" if structural else self._failed_kernel_for(layer, d.blueprint_id)
                if failed:
                    self._note(f"decision {d.decision_id[:8]}: {d.blueprint_id} at {d.layer_name} failed to "
                               f"compile earlier in this run ({failed}); dropped")
                    continue
            try:
                self.morph._apply(d, epoch + 1)
            except (IllegalTransitionError, BlueprintError, GrowthError) as exc:  # the slot moved on since the graph
                self._note(f"decision {d.decision_id[:8]} on {d.layer_name}[{d.seed_index}] dropped: {exc}")
        return len(self.morph.param_group_names()) != before

    def _failed_kernel_for(self, layer: Any, blueprint_id: str) -> str:
        from esper.kasmina.blueprints import get_blueprint

        shape, device, dtype = self._kernel_target(layer.layer_name, layer)
        return self._failed_kernels.get(self._kernel_id(get_blueprint(blueprint_id), shape, device, dtype), "")

    def _kernel_target(self, name: str, layer: Any) -> tuple[list[int], int, int]:
        out = self.morph.output_shapes.get(name) or [-1, layer.chunk_size]
        shape = [-1, int(layer.chunk_size), *[int(d) for d in out[2:]]]
        device = _DEVICE_TYPES[self.morph.device.type]
        dtype = _DTYPES.get(layer._dtype(), common_pb2.D_TYPE_FLOAT32)
        return shape, device, dtype

    @staticmethod
    def _kernel_id(spec: common_pb2.BlueprintSpec, shape: list[int], device: int, dtype: int) -> str:
        from esper.tezzeret.kernel_ids import kernel_id_for

        return kernel_id_for(spec, shape, device, dtype)

    def _germinate(self, layer: Any, d: common_pb2.AdaptationDecision) -> None:
        """Morphogenesis' germinate hook: warm kernels attach at once, cold ones are fetched/compiled."""
        from esper.kasmina.blueprints import get_blueprint

        spec = get_blueprint(d.blueprint_id)
        shape, device, dtype = self._kernel_target(layer.layer_name, layer)
        kernel_id = self._kernel_id(spec, shape, device, dtype)
        key = (layer.layer_name, d.seed_index)
        node = self._last_graph_nodes.get(key)
        pending = PendingSeed(layer.layer_name, d.seed_index, kernel_id, d.blueprint_id, d, time.perf_counter(),
                              self._step,
                              node.seed.telemetry if node is not None else common_pb2.SeedTelemetry(),
                              self._last_signals)
        self._adaptations[key] = pending
        torch_dtype = layer._dtype()
        cached = self.kernels.get(kernel_id, self.morph.device, torch_dtype)
        if cached is not None:
            pending.path = "warm"
            layer.germinate(d.seed_index, spec, module=self._seed_copy(cached, spec), kernel_id=kernel_id,
                            reason=d.reason)
            self._record_germination(pending, "warm")
            return
        layer.germinate(d.seed_index, spec, await_kernel=True, kernel_id=kernel_id, reason=d.reason)
        self._pending[key] = pending
        self._request_kernel(kernel_id, spec, shape, device, dtype)

    @staticmethod
    def _seed_copy(module: torch.nn.Module, spec: common_pb2.BlueprintSpec) -> torch.nn.Module:
        with warnings.catch_warnings():  # torch's pytree warns about its own LeafSpec inside deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            seed = copy.deepcopy(module)  # each seed trains its own parameters
        return compiled_seed(seed, spec.blueprint_id)

    def _request_kernel(self, kernel_id: str, spec, shape, device, dtype) -> None:
        if kernel_id in self._fetching:
            return
        self._fetching.add(kernel_id)
        self._shapes[kernel_id] = list(shape)
        self._submit(self._obtain_kernel(kernel_id, spec, shape, device, dtype))

    def _attach(self, kernel_id: str, epoch: int) -> bool:
        module, via = self._loaded[kernel_id]
        attached = False
        for key, pending in list(self._pending.items()):
            if pending.kernel_id != kernel_id:
                continue
            del self._pending[key]
            layer = self.morph.driver.site(pending.layer)
            if layer.state_of(pending.seed) != S.GERMINATED:
                self._note(f"kernel {kernel_id} arrived for {pending.layer}[{pending.seed}], which is "
                           f"{layer.state_of(pending.seed).name} by now; kept in the kernel cache")
                continue
            spec = layer.blueprint_of(pending.seed)
            seed = self._spares.pop(kernel_id, None)  # a kernel id names one blueprint spec
            if seed is None:
                seed = self._seed_copy(module, spec)
            layer.attach_kernel(pending.seed, seed, kernel_id=kernel_id)
            # cold: compiled for this run; library: the artifact was already in Urza.
            self._record_germination(pending, "library" if via == "urza" else pending.path, via)
            attached = True
        return attached

    def _record_germination(self, pending: PendingSeed, path: str, via: str = "cache") -> None:
        latency = time.perf_counter() - pending.decided_at
        steps = self._step - pending.decided_step
        self.germinations.append({"layer": pending.layer, "seed": pending.seed, "kernel_id": pending.kernel_id,
                                  "blueprint": pending.blueprint_id, "path": path, "via": via,
                                  "latency_s": latency, "steps_meanwhile": steps, "step": self._step})
        self._note(f"{pending.layer}[{pending.seed}] active with kernel {pending.kernel_id} ({path}, via {via}) "
                   f"{latency:.2f} s after the decision, {steps} training steps meanwhile")

    def _compile_failed(self, kernel_id: str, reason: str) -> None:
        self._failed_kernels[kernel_id] = reason
        for key, pending in list(self._pending.items()):
            if pending.kernel_id != kernel_id:
                continue
            del self._pending[key]
            layer = self.morph.driver.site(pending.layer)
            if layer.state_of(pending.seed) == S.GERMINATED:
                layer.cancel(pending.seed, f"compile failed: {reason}")
            self._report(pending, common_pb2.ADAPTATION_OUTCOME_COMPILE_FAILED, reason)

    def _on_lifecycle(self, event: Any) -> None:
        """Every transition goes to Oona; a terminal one of a germination is reported to Tamiyo."""
        msg = common_pb2.LifecycleEvent(run_id=self.run_id, layer_name=event.layer, seed_index=event.seed,
                                        from_state=int(event.from_state), to_state=int(event.to_state),
                                        global_step=event.step, epoch=event.epoch, reason=event.reason)
        msg.create_time.GetCurrentTime()
        self._publish(LIFECYCLE_TOPIC, "LifecycleEvent", msg, key=f"{event.layer}[{event.seed}]")
        key = (event.layer, event.seed)
        outcome = OUTCOMES.get(S(event.to_state))
        if event.to_state == S.CANCELLED and not event.reason.startswith("compile failed"):
            outcome = common_pb2.ADAPTATION_OUTCOME_CANCELLED
        pending = self._adaptations.get(key)
        if outcome is not None and pending is not None:
            self._pending.pop(key, None)
            self._report(pending, outcome, event.reason)

    def _report(self, pending: PendingSeed, outcome: int, reason: str) -> None:
        self._adaptations.pop((pending.layer, pending.seed), None)
        report = common_pb2.FieldReport(run_id=self.run_id, decision=pending.decision, outcome=outcome,
                                        epoch=int(self.morph.driver.epoch))
        report.telemetry_before.CopyFrom(pending.telemetry_before)
        report.signals_before.CopyFrom(pending.signals_before)
        try:
            layer = self.morph.driver.site(pending.layer)
            row = layer.seed_table()[pending.seed]
            report.telemetry_after.CopyFrom(row.to_proto().telemetry)
            if row.last_contribution is not None:
                report.contribution = float(row.last_contribution)
        except (KeyError, IndexError):
            pass
        report.create_time.GetCurrentTime()
        if self._thread is not None and not self._stop.is_set():
            self._loop.call_soon_threadsafe(self._backlog["tamiyo"].append, report)

    def _publish(self, topic: str, type_name: str, message: Any, key: str = "") -> None:
        request = oona_pb2.PublishRequest(topic=topic, key=key, content_type=PROTO_CONTENT.format(type_name),
                                          payload=message.SerializeToString(), source=f"tolaria/{self.run_id}")
        if self._thread is not None and not self._stop.is_set():
            self._loop.call_soon_threadsafe(self._backlog["oona"].append, request)

    # ------------------------------------------------------------------ worker (event loop thread)

    def _link(self, name: str) -> ServiceLink | None:
        return self._links.get(name)

    async def _decide(self, graph: common_pb2.ModelGraphState, submitted: float) -> None:
        link = self._link("tamiyo")
        self._last_graph_nodes = {(n.layer_name, n.seed.seed_index): n for n in graph.nodes}
        self._last_signals = graph.signals
        if link is None or not link.may_call():
            return
        stub = tamiyo_pb2_grpc.TamiyoServiceStub(link.open())
        try:
            reply = await stub.Decide(tamiyo_pb2.DecideRequest(graph=graph), timeout=self.settings.decision_timeout_s)
        except grpc.aio.AioRpcError as err:
            if _is_down(err):
                await link.failed(err)
            else:
                log.warning("Tamiyo rejected the graph: %s", _describe(err))
            return
        link.ok()
        self.decision_latencies_ms.append((time.perf_counter() - submitted) * 1000)
        decisions = list(reply.decisions)
        for d in decisions:
            if d.action != common_pb2.DECISION_ACTION_WAIT:
                self._backlog["oona"].append(oona_pb2.PublishRequest(
                    topic=DECISIONS_TOPIC, key=self.run_id, content_type=PROTO_CONTENT.format("AdaptationDecision"),
                    payload=d.SerializeToString(), source=f"tolaria/{self.run_id}"))
        self._outbox.put(("decisions", decisions))

    async def _call(self, name: str, method_of: Callable[[grpc.aio.Channel], Any], request: Any,
                    timeout: float | None = None) -> Any:
        """One unary call to service `name`, or wait out its backoff first; raises only non-outage errors."""
        link = self._links[name]
        while True:
            wait = link.next_try - time.monotonic()
            if not link.up and wait > 0:
                await asyncio.sleep(wait)
            try:
                reply = await method_of(link.open())(request, timeout=timeout or self.settings.call_timeout_s)
            except grpc.aio.AioRpcError as err:
                if not _is_down(err):
                    link.ok()
                    raise
                await link.failed(err)
                continue
            link.ok()
            return reply

    async def _obtain_kernel(self, kernel_id: str, spec, shape, device, dtype) -> None:
        """Urza first; else compile in Tezzeret and wait for kernel-ready (or the job's end); then load."""
        try:
            via = "urza"
            artifact = await self._find_artifact(kernel_id)
            if artifact is None or artifact.status != common_pb2.ARTIFACT_STATUS_VALIDATED:
                if artifact is not None and artifact.status == common_pb2.ARTIFACT_STATUS_INVALID:
                    raise CompileFailed(artifact.status_reason or "artifact is INVALID in Urza")
                self._compiles_in_flight += 1
                try:
                    via = await self._compile(kernel_id, spec, shape, device, dtype)
                finally:
                    self._compiles_in_flight -= 1
            self._loads_in_flight += 1
            try:
                data, artifact = await self._download(kernel_id)
                module = await asyncio.to_thread(self._slices.run, self._load_kernel, kernel_id, spec, data,
                                                 artifact.sha256)
            finally:
                self._loads_in_flight -= 1
            self._loaded[kernel_id] = (module, via)
            self._outbox.put(("kernel", kernel_id))
        except CompileFailed as exc:
            self._outbox.put(("compile_failed", kernel_id, str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or bad bytes: this kernel fails, training goes on
            log.exception("obtaining kernel %s failed", kernel_id)
            self._outbox.put(("compile_failed", kernel_id, f"{type(exc).__name__}: {exc}"))
        finally:
            self._fetching.discard(kernel_id)

    async def _find_artifact(self, kernel_id: str) -> common_pb2.KernelArtifact | None:
        try:
            reply = await self._call("urza", lambda ch: urza_pb2_grpc.UrzaServiceStub(ch).GetArtifact,
                                     urza_pb2.GetArtifactRequest(kernel_id=kernel_id))
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.artifact

    async def _compile(self, kernel_id: str, spec, shape, device, dtype) -> str:
        """Request the compile and wait until kernel-ready arrives on Oona or the job ends; the path."""
        ready = self._ready_waiters.setdefault(kernel_id, asyncio.Event())
        request = tezzeret_pb2.CompileRequest(blueprint=spec, device=device, dtype=dtype,
                                              timeout_seconds=self.settings.compile_timeout_s)
        request.input_shape.dims.extend(shape)
        job = None
        while True:
            if job is None:
                job = (await self._call("tezzeret", lambda ch: tezzeret_pb2_grpc.TezzeretServiceStub(ch).Compile,
                                        request)).job
                self._note_async(f"compile requested: {kernel_id} (job {job.job_id[:8]}"
                                 f"{', reused' if job.reused else ''})")
            if self._job_done(job):
                return "poll"
            # Success arrives as kernel-ready on Oona; a failure only in the job's own stream (or
            # at the next poll when the stream is unavailable).
            announced = asyncio.ensure_future(ready.wait())
            failure = asyncio.ensure_future(self._watch_failure(job.job_id))
            try:
                await asyncio.wait((announced, failure), timeout=self.settings.poll_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                announced.cancel()
                failure.cancel()
            if ready.is_set():
                return "oona"
            if failure.done() and not failure.cancelled():
                self._job_done(failure.result())  # a failed job: raises CompileFailed
            try:
                job = (await self._call("tezzeret",
                                        lambda ch: tezzeret_pb2_grpc.TezzeretServiceStub(ch).GetCompileJob,
                                        tezzeret_pb2.GetCompileJobRequest(job_id=job.job_id))).job
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                self._note_async(f"Tezzeret lost compile job for {kernel_id} (restarted?); requesting it again")
                job = None

    async def _watch_failure(self, job_id: str) -> tezzeret_pb2.CompileJob:
        """The job once Tezzeret's WatchCompileJob stream shows it failed; otherwise it waits until
        cancelled (success arrives as kernel-ready; a broken stream is covered by the caller's poll)."""
        link = self._links["tezzeret"]
        if link.up:
            try:
                stream = tezzeret_pb2_grpc.TezzeretServiceStub(link.open()).WatchCompileJob(
                    tezzeret_pb2.WatchCompileJobRequest(job_id=job_id), timeout=self.settings.poll_s + 1.0)
                async for reply in stream:
                    if reply.job.state in (tezzeret_pb2.COMPILE_JOB_STATE_FAILED,
                                           tezzeret_pb2.COMPILE_JOB_STATE_TIMED_OUT,
                                           tezzeret_pb2.COMPILE_JOB_STATE_CANCELLED):
                        return reply.job
            except grpc.aio.AioRpcError:
                pass
        await asyncio.Event().wait()  # never set: the caller cancels this at its poll deadline
        raise AssertionError("unreachable")

    @staticmethod
    def _job_done(job: tezzeret_pb2.CompileJob) -> bool:
        if job.state == tezzeret_pb2.COMPILE_JOB_STATE_SUCCEEDED:
            return True
        if job.state in (tezzeret_pb2.COMPILE_JOB_STATE_FAILED, tezzeret_pb2.COMPILE_JOB_STATE_TIMED_OUT,
                         tezzeret_pb2.COMPILE_JOB_STATE_CANCELLED):
            raise CompileFailed(job.error or tezzeret_pb2.CompileJobState.Name(job.state))
        return False

    def _note_async(self, line: str) -> None:
        """A note from the worker thread, printed by the training thread at its next boundary."""
        self._outbox.put(("note", line))

    async def _download(self, kernel_id: str) -> tuple[bytes, common_pb2.KernelArtifact]:
        """The artifact's bytes, checked against its SHA-256 (a mismatch is retried, then fails)."""
        for attempt in range(3):
            link = self._links["urza"]
            if not link.up:
                await asyncio.sleep(max(0.0, link.next_try - time.monotonic()))
            stub = urza_pb2_grpc.UrzaServiceStub(link.open())
            artifact = None
            chunks: list[bytes] = []
            try:
                async for msg in stub.DownloadArtifact(urza_pb2.DownloadArtifactRequest(kernel_id=kernel_id),
                                                       timeout=max(30.0, self.settings.call_timeout_s)):
                    if msg.HasField("metadata"):
                        artifact = msg.metadata
                    else:
                        chunks.append(msg.chunk)
            except grpc.aio.AioRpcError as err:
                if _is_down(err):
                    await link.failed(err)
                    continue
                raise CompileFailed(f"Urza download of {kernel_id} failed: {_describe(err)}") from None
            link.ok()
            data = b"".join(chunks)
            if artifact is not None and hashlib.sha256(data).hexdigest() == artifact.sha256:
                return data, artifact
            log.warning("kernel %s: downloaded bytes do not match SHA-256 %s (attempt %d)", kernel_id,
                        artifact.sha256 if artifact else "?", attempt + 1)
        raise CompileFailed(f"kernel {kernel_id}: downloaded bytes never matched their SHA-256")

    def _load_kernel(self, kernel_id: str, spec: common_pb2.BlueprintSpec, data: bytes,
                     sha256: str) -> torch.nn.Module:
        """Worker thread, in slices granted between training steps (`StepSlices`): verify, keep the
        bytes in the run directory, load (`torch.export.load`), run it once, cache it."""
        from esper.tezzeret import load_kernel_artifact

        module = load_kernel_artifact(data, expected_sha256=sha256).to(self.morph.device)
        self.kernels.save_bytes(kernel_id, data)
        dtype = next((p.dtype for p in module.parameters()), torch.float32)
        # The first forward/backward of a loaded graph is slow (lazy set-up); pay it here, off the
        # training thread, not in the first training step of the seed.
        shape = self._shapes.get(kernel_id)
        if shape is not None:
            x = torch.zeros((2, *shape[1:]), device=self.morph.device, dtype=dtype, requires_grad=True)
            module(x).sum().backward()
            for p in module.parameters():
                p.grad = None
        self.kernels.put(kernel_id, self.morph.device, dtype, module, len(data))
        # The first seed's own copy is made here too, not on the training thread at attach time.
        self._spares[kernel_id] = self._seed_copy(module, spec)
        return module

    async def _kernel_ready_listener(self) -> None:
        """Subscribe to kernel-ready from now on; wake the waiter of each announced kernel id."""
        link = self._link("oona")
        if link is None:
            return
        while not self._stop.is_set():
            if not link.up:
                await asyncio.sleep(max(0.05, link.next_try - time.monotonic()))
            stub = oona_pb2_grpc.OonaServiceStub(link.open())
            try:
                # A long deadline (streams need one); the loop re-subscribes when it expires.
                stream = stub.Subscribe(oona_pb2.SubscribeRequest(topic=KERNEL_READY_TOPIC,
                                                                  start=oona_pb2.SUBSCRIBE_START_LATEST),
                                        timeout=3600.0)
                async for reply in stream:
                    link.ok()
                    event = common_pb2.KernelReadyEvent.FromString(reply.message.payload)
                    kernel_id = event.artifact.kernel_id
                    self._ready_waiters.setdefault(kernel_id, asyncio.Event()).set()
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                await link.failed(err)

    async def _drain_backlogs(self) -> None:
        """Send queued publishes (Oona) and outcome reports (Tamiyo) whenever their service is up."""
        while True:
            sent = False
            for name, backlog in self._backlog.items():
                link = self._links.get(name)
                if link is None:
                    backlog.clear()
                    continue
                while backlog and link.may_call():
                    item = backlog[0]
                    try:
                        if name == "oona":
                            await oona_pb2_grpc.OonaServiceStub(link.open()).Publish(
                                item, timeout=self.settings.call_timeout_s)
                        else:
                            await tamiyo_pb2_grpc.TamiyoServiceStub(link.open()).ReportOutcome(
                                tamiyo_pb2.ReportOutcomeRequest(report=item), timeout=self.settings.call_timeout_s)
                    except grpc.aio.AioRpcError as err:
                        if _is_down(err):
                            await link.failed(err)
                            break
                        log.warning("%s rejected a message: %s", name, _describe(err))
                    else:
                        link.ok()
                        sent = True
                    backlog.popleft()
            await asyncio.sleep(0 if sent else 0.02)
