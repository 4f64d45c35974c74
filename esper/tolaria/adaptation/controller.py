"""`RemoteController`: adaptation through Tamiyo, Urza, Tezzeret and Oona, as the morphogenesis
controller (`esper.tolaria.controllers.Controller`: `decide` / `germinate` / `germination_grace` /
`state_dict` / `load_state_dict`, given to `Morphogenesis` by the factory of
`esper.tolaria.services.RunServices`) and so the trainer's first hook
(`after_step` / `after_epoch` / `before_restore`). It decides (asks Tamiyo), applies (at step
boundaries, the only place the model changes) and keeps the state of in-flight adaptations; the
network work is the worker's (`AdaptationWorker`), kernels are the pipeline's (`KernelPipeline`),
publishes and outcome reports the reporter's (`Reporter`). See `esper.tolaria.adaptation`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from esper.kasmina import (
    BlueprintError,
    IllegalTransitionError,
    get_blueprint,
    seed_from_kernel,
)
from esper.kasmina.growth.errors import GrowthError
from esper.lifecycle import SeedLifecycleState as S
from esper.tezzeret.kernel_ids import kernel_id_for
from esper.tolaria.adaptation.decisions import DecisionRequests
from esper.tolaria.adaptation.kernels import KernelStore, kernel_target
from esper.tolaria.adaptation.links import ServiceLinks, open_links
from esper.tolaria.adaptation.outbox import DecisionsArrived, KernelFailed, KernelLoaded, Note, Outbox
from esper.tolaria.adaptation.pending import PendingKernels
from esper.tolaria.adaptation.pipeline import KernelPipeline
from esper.tolaria.adaptation.prefetch import first_blueprints
from esper.tolaria.adaptation.records import Adaptation
from esper.tolaria.adaptation.reporting import (
    COMPILE_FAILED_PREFIX,
    UNAVAILABLE_PREFIX,
    Reporter,
    field_report,
    outcome_of,
)
from esper.tolaria.adaptation.timing import StepTimer
from esper.tolaria.adaptation.worker import AdaptationWorker
from esper.tolaria.hooks import BoundaryHook
from esper.tolaria.seed_groups import sync_seed_groups
from esper.tolaria.services_config import ServicesConfig
from esper.v1 import common_pb2

log = logging.getLogger("esper.tolaria.adaptation")

# The services a germinating seed waits for: while one is down its timeouts do not run out.
KERNEL_SERVICES = ("urza", "tezzeret")

class RemoteController(BoundaryHook):
    """Adaptation through the services; see the module docstring."""

    def __init__(self, morph: Any, settings: ServicesConfig, run_dir: Path, *,
                 echo: Callable[[str], None] | None = None):
        self.morph = morph
        self.settings = settings
        self.run_id = morph.run_id
        self.echo = echo or (lambda line: log.info(line))
        self.worker = AdaptationWorker()
        self.outbox = Outbox()
        self.kernels = KernelStore(Path(run_dir) / "kernels")
        self.reporter = Reporter(self.run_id, self.worker, settings.call_timeout_s)
        self.pipeline: KernelPipeline | None = None
        self.links = ServiceLinks()
        self.timer = StepTimer(self._phase)
        self._pending = PendingKernels()
        self._adaptations: dict[tuple[str, int], Adaptation] = {}
        self._failed_kernels: dict[str, str] = {}
        self._prefetched: set[str] = set()  # kernel ids obtained before any germination asked for them
        self.germinations: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.decisions = DecisionRequests(self.worker, self.outbox, self.reporter, settings.decision_timeout_s,
                                          self._note)
        self._step = 0
        self._status_listener: Callable[[bool, str], None] | None = None
        for _, layer in morph.driver.sites:
            layer.add_listener(self._on_lifecycle)

    # ---------------------------------------------------------------- lifecycle of the controller

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
        s = self.settings
        self.links = open_links(s, addresses, self._links_changed)
        self.pipeline = KernelPipeline(s, self.kernels, self.morph.device, self.outbox, urza=self.links.get("urza"),
                                       tezzeret=self.links.get("tezzeret"), oona=self.links.get("oona"),
                                       submit=self.worker.submit, stopping=self.worker.stopping.is_set)
        self.reporter.connect(self.links.get("oona"), self.links.get("tamiyo"))
        self.decisions.tamiyo = self.links.get("tamiyo")
        self.worker.start()
        self.worker.submit(self.pipeline.listen_kernel_ready())
        self.worker.submit(self.reporter.drain_forever())

    def close(self, timeout: float = 5.0) -> None:
        """Flush what can be flushed within `timeout`, then stop the worker thread."""
        if self.pipeline is not None:
            self.pipeline.slices.release()  # no more steps will grant slices

        async def close_links() -> None:
            for link in self.links.values():
                await link.close()

        self.worker.stop(lambda: self.reporter.flush(timeout), close_links, timeout)

    def outages(self) -> dict[str, int]:
        """Times each service went down during the run."""
        return self.links.outages()

    def on_status_change(self, listener: Callable[[bool, str], None]) -> None:
        self._status_listener = listener

    def _links_changed(self) -> None:
        if self._status_listener is not None:
            self._status_listener(*self.paused())

    def paused(self) -> tuple[bool, str]:
        """(adaptation paused, why): a service the cycle needs is down."""
        return self.links.paused()

    @property
    def step_times(self) -> list[tuple[float, str, int]]:
        return self.timer.samples

    def load_slice_waits(self) -> list[float]:
        """Seconds each kernel-load slice took (empty before `connect`)."""
        return list(self.pipeline.slices.waited_s) if self.pipeline is not None else []

    # ---------------------------------------------------------------- decide

    def decide(self, state: common_pb2.ModelGraphState) -> list[common_pb2.AdaptationDecision]:
        """Send the graph to Tamiyo in the background; decisions are applied at the next step boundary."""
        state.signals.initial_flops_per_sample = float(self.morph.flops_initial)
        self.decisions.submit(state)
        return []

    @property
    def decision_latencies_ms(self) -> list[float]:
        """Round trips of the Decide calls that returned (training thread to outbox)."""
        return self.decisions.latencies_ms

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: failed kernels and the decisions behind in-flight adaptations."""
        return {"failed_kernels": dict(self._failed_kernels),
                "adaptations": [a.to_dict() for a in self._adaptations.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._failed_kernels = dict(state.get("failed_kernels", {}))
        self._adaptations = {}
        for a in state.get("adaptations", []):
            record = Adaptation.from_dict(a)
            self._adaptations[record.key] = record
        # A governor rollback loads this after the model: a slot it reverted to DORMANT waits for
        # no kernel any more (one arriving later would otherwise find the slot moved on).
        def reverted(pending: Adaptation) -> bool:
            return self.morph.driver.site(pending.layer).state_of(pending.seed) != S.GERMINATED

        for pending in self._pending.take_if(reverted):
            self._note(f"{pending.layer}[{pending.seed}] no longer waits for kernel {pending.kernel_id}: "
                       "the governor's rollback reverted its germination")

    def before_restore(self, payload: dict[str, Any]) -> None:
        """Before a checkpoint is loaded: seeds that ran a compiled kernel get that kernel back.

        The module comes from this run's verified copy of the artifact (``kernels/``); without the
        copy Kasmina builds the seed from its blueprint, which loads the same weights.
        """
        self.kernels.restore_seeds(self.morph.driver.sites, payload["model"], self.morph.device)

    def resume_pending(self, global_step: int) -> int:
        """After a resume: fetch (or compile) the kernels of slots still GERMINATED; their count."""
        self._step = global_step
        count = 0
        for name, layer in self.morph.driver.sites:
            for i in range(layer.num_seeds):
                spec = layer.blueprint_of(i)
                if layer.state_of(i) != S.GERMINATED or spec is None:
                    continue
                record = self._adaptations.get((name, i))
                shape, device, dtype = self._kernel_target(name, layer)
                kernel_id = layer.seed_table()[i].kernel_id or kernel_id_for(spec, shape, device, dtype)
                pending = Adaptation.resumed(name, i, kernel_id, spec.blueprint_id, self._step, record)
                self._pending.add(pending)
                self._adaptations[pending.key] = pending
                self.pipeline.request(kernel_id, spec, shape, device, dtype)
                count += 1
        if count:
            self._note(f"resume: {count} germinated seed(s) waiting for their kernels again")
        return count

    def prefetch_first_kernels(self, blueprints: Sequence[str], parameter_budget: float,
                               compute_budget: float) -> list[str]:
        """Before training: start obtaining, at each site, the kernel of the blueprint the heuristic
        policy picks first there (the largest allowed one within the initial budget); their ids.

        A cold compile takes seconds, as long as many epochs of a small model: without this the
        first seed arrives after the host has converged and has nothing left to contribute. A kernel
        the policy never asks for costs one compile; one it asks for attaches warm (or joins the
        fetch under way). Sites with the same chunk shape share one kernel id, so one request.
        """
        if self.pipeline is None or not self.morph.enabled:
            return []
        state = self.morph.graph_state(0, 0, 1, float("nan"), float("nan"), 0.0, [])
        requested: list[str] = []
        for name, blueprint_id in first_blueprints(state, blueprints, parameter_budget * state.signals.initial_parameter_count,
                                                   compute_budget * self.morph.flops_initial):
            spec = get_blueprint(blueprint_id)
            shape, device, dtype = self._kernel_target(name, self.morph.driver.site(name))
            kernel_id = kernel_id_for(spec, shape, device, dtype)
            if kernel_id in requested or kernel_id in self._failed_kernels:
                continue
            requested.append(kernel_id)
            self._prefetched.add(kernel_id)
            self.pipeline.request(kernel_id, spec, shape, device, dtype)
        if requested:
            self._note(f"prefetching the likely first kernel(s): {', '.join(requested)}")
        return requested

    # ---------------------------------------------------------------- trainer hooks

    def after_step(self, trainer: Any, epoch: int, loss: float) -> bool:
        self.timer.boundary(trainer.state.global_step)
        self._drain(trainer, epoch)
        if self.timer.last_step_s and self.pipeline is not None:
            self.pipeline.slices.grant(self.timer.last_step_s)  # a kernel load's turn, if one is waiting
        self.timer.opened()
        return False

    def after_epoch(self, trainer: Any, epoch: int, record: Any) -> bool:
        self.timer.pause()
        self._drain(trainer, epoch)
        values = {k: float(v) for k, v in record.__dict__.items() if k != "epoch" and isinstance(v, int | float)}
        self.reporter.publish_epoch_metrics(epoch + 1, trainer.state.global_step, values)
        return False

    def _phase(self) -> str:
        return self.pipeline.phase() if self.pipeline is not None else ""

    def _kernel_services_down(self) -> bool:
        return self.links.any_down(KERNEL_SERVICES)

    def germination_grace(self, layer: str, seed: int) -> int:
        """Epochs the driver adds to this seed's germination timeout: those it waited through an outage."""
        return self._pending.grace_epochs((layer, seed))

    def _drain(self, trainer: Any, epoch: int) -> None:
        self._step = trainer.state.global_step
        # Time waited while Urza or Tezzeret is down extends a germination's wait, not ends it.
        self._pending.track_outages(self._kernel_services_down, epoch)
        self._cancel_overdue()
        changed = False
        for item in self.outbox.drain():
            if isinstance(item, DecisionsArrived):
                changed |= self._apply_decisions(item.decisions, epoch)
            elif isinstance(item, KernelLoaded):
                changed |= self._attach(item.kernel_id)
            elif isinstance(item, KernelFailed):
                self._compile_failed(item.kernel_id, item.reason, item.deterministic)
            elif isinstance(item, Note):
                self._note(item.line)
        if changed:
            sync_seed_groups(trainer.optimizer, self.morph.param_groups(), trainer.config.optim.lr)

    def _note(self, line: str) -> None:
        self.events.append({"step": self._step, "t": time.time(), "note": line})
        self.echo(f"  [services] {line}")

    # ---------------------------------------------------------------- apply

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
                self.morph.apply_decision(d, epoch + 1)
            except (IllegalTransitionError, BlueprintError, GrowthError) as exc:  # the slot moved on since the graph
                self._note(f"decision {d.decision_id[:8]} on {d.layer_name}[{d.seed_index}] dropped: {exc}")
        return len(self.morph.param_group_names()) != before

    def _failed_kernel_for(self, layer: Any, blueprint_id: str) -> str:
        shape, device, dtype = self._kernel_target(layer.layer_name, layer)
        return self._failed_kernels.get(kernel_id_for(get_blueprint(blueprint_id), shape, device, dtype), "")

    def _kernel_target(self, name: str, layer: Any) -> tuple[list[int], int, int]:
        return kernel_target(layer, self.morph.output_shapes.get(name), self.morph.device)

    def germinate(self, layer: Any, d: common_pb2.AdaptationDecision) -> None:
        """A branch seed's germination: warm kernels attach at once, cold ones are fetched/compiled."""
        spec = get_blueprint(d.blueprint_id)
        shape, device, dtype = self._kernel_target(layer.layer_name, layer)
        kernel_id = kernel_id_for(spec, shape, device, dtype)
        key = (layer.layer_name, d.seed_index)
        node = self.decisions.last_nodes.get(key)
        pending = Adaptation(layer.layer_name, d.seed_index, kernel_id, d.blueprint_id, d, time.perf_counter(),
                             self._step, node.seed.telemetry if node is not None else common_pb2.SeedTelemetry(),
                             self.decisions.last_signals, graph_before=self.decisions.last_graph)
        self._adaptations[key] = pending
        cached = self.kernels.get(kernel_id, self.morph.device, layer.seed_dtype())
        if cached is not None:
            # A prefetched kernel's first use is still a cold germination (compiled for this run),
            # only one that did not have to wait.
            prefetched = kernel_id in self._prefetched
            self._prefetched.discard(kernel_id)
            pending.path = "cold" if prefetched else "warm"
            via = self.pipeline.loaded.get(kernel_id, (None, "cache"))[1] if prefetched else "cache"
            layer.germinate(d.seed_index, spec, module=seed_from_kernel(cached, spec), kernel_id=kernel_id,
                            reason=d.reason)
            self._record_germination(pending, "library" if via == "urza" else pending.path, via)
            return
        layer.germinate(d.seed_index, spec, await_kernel=True, kernel_id=kernel_id, reason=d.reason)
        self._pending.add(pending)
        self.pipeline.request(kernel_id, spec, shape, device, dtype)

    def _cancel_overdue(self) -> None:
        """Cancel seeds whose kernel has not arrived within services.germination_timeout_s (wall clock)."""
        limit = self.settings.germination_timeout_s
        if limit <= 0 or not self._pending or self._kernel_services_down():
            return  # while a service the kernel needs is down, germinations wait for it
        for pending in self._pending.take_overdue(limit):
            layer = self.morph.driver.site(pending.layer)
            if layer.state_of(pending.seed) == S.GERMINATED:
                layer.cancel(pending.seed, f"no kernel arrived within {limit:g} s")  # reported by _on_lifecycle

    def _attach(self, kernel_id: str) -> bool:
        module, via = self.pipeline.loaded[kernel_id]
        attached = False
        for pending in self._pending.take(kernel_id):
            layer = self.morph.driver.site(pending.layer)
            if layer.state_of(pending.seed) != S.GERMINATED:
                self._note(f"kernel {kernel_id} arrived for {pending.layer}[{pending.seed}], which is "
                           f"{layer.state_of(pending.seed).name} by now; kept in the kernel cache")
                continue
            spec = layer.blueprint_of(pending.seed)
            seed = self.pipeline.spares.pop(kernel_id, None)  # a kernel id names one blueprint spec
            if seed is None:
                seed = seed_from_kernel(module, spec)
            layer.attach_kernel(pending.seed, seed, kernel_id=kernel_id)
            self._prefetched.discard(kernel_id)  # its first use is this one
            # cold: compiled for this run; library: the artifact was already in Urza.
            self._record_germination(pending, "library" if via == "urza" else pending.path, via)
            attached = True
        return attached

    def _record_germination(self, pending: Adaptation, path: str, via: str = "cache") -> None:
        latency = time.perf_counter() - pending.decided_at
        steps = self._step - pending.decided_step
        self.germinations.append({"layer": pending.layer, "seed": pending.seed, "kernel_id": pending.kernel_id,
                                  "blueprint": pending.blueprint_id, "path": path, "via": via,
                                  "latency_s": latency, "steps_meanwhile": steps, "step": self._step})
        self._note(f"{pending.layer}[{pending.seed}] active with kernel {pending.kernel_id} ({path}, via {via}) "
                   f"{latency:.2f} s after the decision, {steps} training steps meanwhile")

    def _compile_failed(self, kernel_id: str, reason: str, deterministic: bool = True) -> None:
        """Cancel the seeds waiting for `kernel_id`. Only the compiler's verdict (`deterministic`)
        puts the kernel on the run-long failed list; an outage's casualties are reported as
        SERVICE_UNAVAILABLE, which Tamiyo does not count against max_adaptations."""
        if deterministic:
            self._failed_kernels[kernel_id] = reason
        prefix = COMPILE_FAILED_PREFIX if deterministic else UNAVAILABLE_PREFIX
        outcome = (common_pb2.ADAPTATION_OUTCOME_COMPILE_FAILED if deterministic
                   else common_pb2.ADAPTATION_OUTCOME_SERVICE_UNAVAILABLE)
        for pending in self._pending.take(kernel_id):
            layer = self.morph.driver.site(pending.layer)
            if layer.state_of(pending.seed) == S.GERMINATED:
                layer.cancel(pending.seed, f"{prefix}: {reason}")
            self._report(pending, outcome, reason)

    # ---------------------------------------------------------------- outcomes

    def _on_lifecycle(self, event: Any) -> None:
        """Every transition goes to Oona; a terminal one of a germination is reported to Tamiyo."""
        self.reporter.publish_lifecycle(event)
        key = (event.layer, event.seed)
        pending = self._adaptations.get(key)
        outcome = outcome_of(event, pending)
        if outcome is not None and pending is not None:
            self._pending.discard(key)
            self._report(pending, outcome, event.reason)

    def _report(self, pending: Adaptation, outcome: int, reason: str) -> None:
        self._adaptations.pop(pending.key, None)
        try:
            row = self.morph.driver.site(pending.layer).seed_table()[pending.seed]
        except (KeyError, IndexError):
            row = None
        self.reporter.report(field_report(self.run_id, pending, outcome, int(self.morph.driver.epoch), row))
