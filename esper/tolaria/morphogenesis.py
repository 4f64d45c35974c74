"""The morphogenetic loop of a run: seed sites, lifecycle driving, the controller, bookkeeping.

Each step: `after_step` advances every live seed table (one op per layer) and applies the step
gates. Each epoch boundary, `epoch_end`:
  1. runs the epoch gates; seeds in EVALUATING / FINE_TUNING get a counterfactual measurement
     (validation accuracy with the seed vs with its alpha forced to 0) and are fossilized or culled;
  2. builds the `ModelGraphState` (one node per seed slot with its telemetry) and asks the
     controller (a Tamiyo policy behind the safety rails) for decisions;
  3. applies them (germinate / cull / fossilize / cancel) and reports the optimizer groups to
     add or drop, so new seed parameters join the optimizer without touching the host's state.
Adaptations (one per germination) and a per-slot timeline are kept for the summary and the plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.kasmina import KasminaLayer, LifecycleDriver, seed_sites, wrap
from esper.kasmina.lifecycle import ACTIVE_STATES, LifecycleEvent
from esper.lifecycle import SeedLifecycleState as S
from esper.tolaria.config import Config, ConfigError
from esper.tolaria.controllers import Controller, policy_controller
from esper.tolaria.graph_state import model_graph_state, probe_output_shapes
from esper.tolaria.growth_modes import RunGrowth
from esper.tolaria.hosts import count_parameters, forward_flops_per_sample
from esper.v1 import common_pb2

# In-flight states whose seed changes the host's output (`h + alpha * s`). GERMINATED has no module
# and TRAINING is straight-through (exactly `h`), so neither can cause a loss anomaly.
BLENDED = frozenset({S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING})
OUTCOMES = {
    S.FOSSILIZED: "fossilized",
    S.CULLED: "culled",
    S.CANCELLED: "cancelled",
    S.ROLLED_BACK: "rolled_back",
}


def group_name(layer: str, index: int) -> str:
    """Optimizer param-group name of one seed's parameters."""
    return f"seed:{layer}:{index}"


@dataclass
class Growth:
    """Optimizer changes an epoch boundary asks for."""

    added_groups: list[tuple[str, list[nn.Parameter]]] = field(default_factory=list)
    removed_groups: list[str] = field(default_factory=list)
    # Forward+backward FLOPs spent deciding how to grow (width seeds' statistics pass).
    flops: float = 0.0


class Morphogenesis:
    """Seeds of one run; `enabled=False` keeps the seed sites but never germinates (the baseline)."""

    def __init__(self, host: nn.Module, cfg: Config, run_id: str, input_shape: tuple[int, ...],
                 device: torch.device, params_initial: int, flops_initial: float, enabled: bool,
                 controller: Callable[[Morphogenesis], Controller] | None = None, steps_per_epoch: int = 1,
                 total_steps: int = 0) -> None:
        """`controller(self)` builds the run's controller once the seed sites exist (it may need
        them); by default the in-process policy of the config's ``controller`` section.
        `total_steps`: steps of the whole run (0 = unknown): germinations whose lifecycle cannot
        reach a verdict in the steps left are refused (see LifecycleDriver.can_finish)."""
        self.cfg = cfg
        self.run_id = run_id
        self.enabled = enabled
        self.input_shape = input_shape
        self.device = device
        self.params_initial = params_initial
        self.flops_initial = flops_initial
        sites = list(cfg.seeds.sites) or list(getattr(host, "seed_site_names", lambda: [])())
        if not sites:
            raise ConfigError(f"seeds.sites: model '{cfg.model.name}' names no seed sites; expected a list of layer names")
        try:
            self.model = wrap(host, sites, seeds_per_layer=cfg.seeds.num_seeds)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"seeds: {str(exc).strip(chr(34))}") from None
        from esper.kasmina.blueprints import CATALOG

        unknown = [b for b in cfg.seeds.blueprints if b not in CATALOG]
        if unknown:
            raise ConfigError(f"seeds.blueprints: unknown blueprint(s) {unknown}; expected some of {sorted(CATALOG)}")
        per_site_unknown = [s for s in cfg.lifecycle.min_contribution_per_site if s not in sites]
        if per_site_unknown:
            raise ConfigError(f"lifecycle.min_contribution_per_site: {per_site_unknown} are not seed sites; expected some of {sites}")
        self._evaluate_acc: Callable[[], float] = lambda: 0.0
        self.driver = LifecycleDriver(self.model, cfg.lifecycle, evaluate=lambda: self._evaluate_acc(),
                                      germination_grace=self._germination_grace)
        self.driver.add_listener(self._on_event)
        self.output_shapes = probe_output_shapes(self.model, self.driver.sites, self.input_shape, self.device)
        self.controller: Controller = (controller or policy_controller)(self)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.refused: list[dict[str, Any]] = []
        self._adaptations: list[dict[str, Any]] = []
        self._timeline: list[dict[str, Any]] = [
            {"slot": f"{name}[{i}]", "epoch": 0.0, "state": int(S.DORMANT)}
            for name, layer in self.driver.sites for i in range(layer.num_seeds)
        ]
        self._event_log = None
        # Set by every lifecycle event; the trainer re-takes the governor's snapshot and clears it,
        # so that a rollback restores the seeds as they are (germinations made mid-epoch included).
        self.lifecycle_changed = False
        # Set by the trainer under --verbose: prints every lifecycle transition as it happens.
        self.echo: Callable[[str], None] | None = None
        self._flops_cache: tuple[tuple, float] | None = None
        # Validation accuracy per epoch, for the accuracy trend learned policies read.
        self.accuracy_history: list[float] = []
        if enabled:
            for _, layer in self.driver.sites:
                layer.set_telemetry_probe(True)  # the controller needs health of dormant sites too
        # Width seeds (growth.modes has "width"); the trainer sets .batches and .optimizer.
        self.growth: RunGrowth | None = None
        self._growth_flops = 0.0  # spent by decisions since the last epoch_end
        if RunGrowth.enabled_for(self.model, cfg.growth):
            self.growth = RunGrowth(self.model, cfg.growth, self.driver.sites, input_shape, seed=cfg.train.seed)

    # ---------------------------------------------------------------- wiring

    def sites(self) -> list[str]:
        return [name for name, _ in self.driver.sites]

    def attach_event_log(self, path: Path, resume_step: int | None) -> None:
        """Lifecycle events go to events.jsonl (cut back to the checkpoint step on a resume)."""
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()
        self._event_log = path.open("a")

    def _germination_grace(self, layer: str, seed: int) -> int:
        """Epochs the driver adds to a germinating seed's timeout: the controller knows (outages)."""
        return self.controller.germination_grace(layer, seed)

    def _on_event(self, event: LifecycleEvent) -> None:
        self.lifecycle_changed = True
        epoch_f = event.step / max(1, self.steps_per_epoch)
        self._timeline.append({"slot": f"{event.layer}[{event.seed}]", "epoch": epoch_f, "state": int(event.to_state)})
        if event.to_state in OUTCOMES:
            for record in reversed(self._adaptations):
                if record["layer"] == event.layer and record["seed"] == event.seed and record["outcome"] == "pending":
                    record["outcome"] = OUTCOMES[event.to_state]
                    record["resolved_epoch"] = round(epoch_f, 3)
                    record["reason"] = event.reason
                    layer = self.driver.site(event.layer)
                    value = float(layer.table.contribution[event.seed])
                    record["contribution"] = None if math.isnan(value) else value
                    break
        if self.echo is not None:
            self.echo(f"  [step {event.step}] {event.layer}[{event.seed}] {event.from_state.name} -> "
                      f"{event.to_state.name}: {event.reason}")
        if self._event_log is not None:
            self._event_log.write(json.dumps({
                "step": event.step, "epoch": round(epoch_f, 4), "layer": event.layer, "seed": event.seed,
                "from": event.from_state.name, "to": event.to_state.name, "reason": event.reason,
            }) + "\n")
            self._event_log.flush()

    # ---------------------------------------------------------------- per step / epoch

    def after_step(self, global_step: int, epoch: int) -> bool:
        """Advances lifecycles after an optimizer step; True when seeds were removed or changed."""
        self.driver.set_position(global_step - 1, epoch)
        events = self.driver.step()
        return bool(events)

    def epoch_end(self, epoch: int, global_step: int, total_epochs: int, train_loss: float, val_loss: float,
                  val_acc: float, history: list[float], evaluate: Callable[[], tuple[float, float]]) -> Growth:
        """Epoch gates, the controller's decisions and the optimizer changes they need."""
        before = {n: [id(p) for p in params] for n, params in self.param_groups()}
        self._evaluate_acc = lambda: evaluate()[1]
        self.driver.set_position(global_step, epoch)
        self.driver.end_epoch(baseline=val_acc)
        if self.growth is not None and self.growth.merge_fossilized():
            self.output_shapes = probe_output_shapes(self.model, self.driver.sites, self.input_shape, self.device)
        self.accuracy_history.append(val_acc)
        if self.enabled:
            state = self.graph_state(epoch + 1, global_step, total_epochs, train_loss, val_loss, val_acc, history)
            for decision in self.controller.decide(state):
                self.apply_decision(decision, epoch + 1)
        for _, layer in self.driver.sites:
            layer.reset_telemetry()
        after = dict(self.param_groups())
        # A slot can hold a new seed under the same group name (a merged width seed, then the next).
        changed = {n for n, params in after.items() if n in before and before[n] != [id(p) for p in params]}
        return Growth(
            added_groups=[(n, p) for n, p in after.items() if n not in before or n in changed],
            removed_groups=[n for n in before if n not in after or n in changed],
            flops=self._take_growth_flops(),
        )

    def _take_growth_flops(self) -> float:
        flops, self._growth_flops = self._growth_flops, 0.0
        return flops

    def apply_decision(self, d: common_pb2.AdaptationDecision, epoch: int) -> float:
        """Carry out one controller decision (a branch seed germinates through the controller);
        returns the FLOPs it spent (a width seed's statistics pass), which are also added to the
        growth FLOPs the next `epoch_end` reports (decisions the remote controller applies between
        epoch boundaries included). Raises IllegalTransitionError / BlueprintError / GrowthError
        when the slot cannot take it."""
        action = d.action
        flops = 0.0
        if action == common_pb2.DECISION_ACTION_WAIT:
            return flops
        layer = self.driver.site(d.layer_name)
        if action == common_pb2.DECISION_ACTION_GERMINATE:
            mode = {common_pb2.GROWTH_MODE_WIDTH: "width", common_pb2.GROWTH_MODE_DEPTH: "depth"}.get(
                d.growth_mode, "branch")
            steps_left = self.total_steps - self.driver.global_step
            direct = mode == "width" and self.growth is not None and self.growth.direct_width  # no lifecycle
            if self.total_steps and not direct and not self.driver.can_finish(steps_left, self.steps_per_epoch):
                self.refused.append({"epoch": epoch, "layer": d.layer_name, "seed": d.seed_index,
                                     "blueprint": d.blueprint_id, "steps_left": steps_left})
                return flops
            self._adaptations.append({
                "epoch": epoch, "layer": d.layer_name, "seed": d.seed_index,
                "blueprint": mode if mode != "branch" else d.blueprint_id, "mode": mode,
                "outcome": "pending", "contribution": None, "decision": d.reason, "reason": "",
                "parameters": 0,
            })
            if mode != "branch":
                if self.growth is None:
                    raise ConfigError(f"growth.modes: the controller asked for {mode} growth at {d.layer_name}, "
                                      f"but {mode} is not an allowed mode or the model cannot grow that way")
                params_before = count_parameters(self.model)
                flops = self.eval_flops_per_sample() * self.growth.germinate(d)
                self._growth_flops += flops
                if mode == "width" and self.growth.direct_width:
                    self._record_direct_growth(epoch, count_parameters(self.model) - params_before)
                    return flops
            else:
                self.controller.germinate(layer, d)
            self._adaptations[-1]["parameters"] = sum(p.numel() for p in layer.seed_parameters(d.seed_index))
        elif action == common_pb2.DECISION_ACTION_CULL:
            layer.cull(d.seed_index, f"controller: {d.reason}")
        elif action == common_pb2.DECISION_ACTION_CANCEL:
            layer.cancel(d.seed_index, f"controller: {d.reason}")
        elif action == common_pb2.DECISION_ACTION_FOSSILIZE:
            layer.transition(d.seed_index, S.FOSSILIZED, f"controller: {d.reason}")
        return flops

    def _record_direct_growth(self, epoch: int, parameters: int) -> None:
        """A width growth merged at once (no seed lifecycle): resolved as it is made."""
        record = self._adaptations[-1]
        record.update(outcome="fossilized", resolved_epoch=float(epoch), parameters=parameters,
                      reason="merged at once (growth.width_lifecycle: direct)")
        self.output_shapes = probe_output_shapes(self.model, self.driver.sites, self.input_shape, self.device)
        if self._event_log is not None:
            self._event_log.write(json.dumps({
                "step": self.driver.global_step, "epoch": float(epoch), "layer": record["layer"], "seed": -1,
                "from": "DORMANT", "to": "MERGED", "reason": record["reason"],
            }) + "\n")
            self._event_log.flush()

    def graph_state(self, epoch: int, global_step: int, total_epochs: int, train_loss: float, val_loss: float,
                    val_acc: float, history: list[float]) -> common_pb2.ModelGraphState:
        """The ModelGraphState Tamiyo sees (see `esper.tolaria.graph_state`)."""
        return model_graph_state(self, epoch, global_step, total_epochs, train_loss, val_loss, val_acc, history)

    # ---------------------------------------------------------------- governor support

    def roll_back_culprit(self, epoch: int, global_step: int, reason: str) -> str | None:
        """Rolls back the most recent in-flight seed that blends into the host's output (the likeliest
        cause of an anomaly); its name. Seeds that leave the output unchanged are never blamed."""
        for record in reversed(self._adaptations):
            if record["outcome"] != "pending":
                continue
            layer = self.driver.site(record["layer"])
            if layer.state_of(record["seed"]) in BLENDED:
                self.driver.set_position(global_step, epoch)
                layer.rollback(record["seed"], f"governor: {reason}")
                return f"{record['layer']}[{record['seed']}]"
        return None

    # ---------------------------------------------------------------- queries

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """(group name, parameters) of every seed that has a module, in site order."""
        out = []
        for name, layer in self.driver.sites:
            for i in range(layer.num_seeds):
                params = layer.seed_parameters(i)
                if params:
                    out.append((group_name(name, i), params))
        return out

    def param_group_names(self) -> list[str]:
        return [n for n, _ in self.param_groups()]

    def active_count(self) -> int:
        return sum(layer.num_active for _, layer in self.driver.sites)

    def describe(self) -> str:
        parts = []
        for name, layer in self.driver.sites:
            for i in range(layer.num_seeds):
                state = layer.state_of(i)
                if state != S.DORMANT:
                    parts.append(f"{name}[{i}] {state.name}")
        return ", ".join(parts) or "all dormant"

    def eval_flops_per_sample(self) -> float:
        """Forward FLOPs per sample of the model as it is now, counted again only when its structure
        changed: the set of running seeds, a site's seed or host module, or a merge. A seed's
        lifecycle state does not change its count (every active seed runs in the counting pass)."""
        active = tuple((name, i) for name, layer in self.driver.sites
                       for i in range(layer.num_seeds) if layer.state_of(i) in ACTIVE_STATES)
        versions = tuple(layer.structure_version for _, layer in self.driver.sites)
        merged = self.growth.merged() if self.growth is not None else ()
        key = (active, versions, merged)
        if self._flops_cache is None or self._flops_cache[0] != key:
            grown = active or merged
            value = self.flops_initial if not grown else forward_flops_per_sample(self.model, self.input_shape, self.device)
            self._flops_cache = (key, value)
        return self._flops_cache[1]

    def train_flops_per_sample(self) -> float:
        return self.eval_flops_per_sample()

    def state_counts(self) -> dict[str, int]:
        """Final state of every seed that was ever germinated (by adaptation outcome) and of the slots."""
        counts: dict[str, int] = {}
        for record in self._adaptations:
            outcome = record["outcome"]
            if outcome == "pending":
                layer = self.driver.site(record["layer"])
                outcome = layer.state_of(record["seed"]).name.lower()
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def adaptations(self) -> list[dict[str, Any]]:
        out = []
        for record in self._adaptations:
            r = dict(record)
            if r["outcome"] == "pending":
                layer = self.driver.site(r["layer"])
                r["outcome"] = layer.state_of(r["seed"]).name.lower()
                value = float(layer.table.contribution[r["seed"]])
                r["contribution"] = None if math.isnan(value) else value
            out.append(r)
        return out

    def timeline(self) -> list[dict[str, Any]]:
        return list(self._timeline)

    def manifest(self) -> list[dict[str, Any]]:
        """Seeds with modules (the layer's own state_dict rebuilds them; kept for the export manifest)."""
        out = []
        for name, layer in self.driver.sites:
            for i in range(layer.num_seeds):
                spec = layer.blueprint_of(i)
                out.append({"layer": name, "seed": i, "state": layer.state_of(i).name,
                            "blueprint": spec.blueprint_id if spec is not None else ""})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "adaptations": [dict(r) for r in self._adaptations],
            "timeline": [dict(r) for r in self._timeline],
            "clock": {"global_step": self.driver.global_step, "epoch": self.driver.epoch},
            "growth": self.growth.state_dict() if self.growth is not None else None,
            "accuracy_history": list(self.accuracy_history),
        }

    def restore_structure(self, state: dict[str, Any]) -> None:
        """Rebuilds a checkpoint's grown host structure (merged width) before its weights load."""
        recorded = state.get("growth")
        if recorded and (recorded.get("merged") or recorded.get("deepened")) and self.growth is None:
            raise ConfigError("growth.modes: the checkpoint's model grew in width or depth; expected the same "
                              "growth.modes as the run that wrote it")
        if self.growth is not None:
            try:
                self.growth.restore_structure(recorded)
            except ValueError as exc:
                raise ConfigError(f"growth.modes: {exc}") from None
            self.output_shapes = probe_output_shapes(self.model, self.driver.sites, self.input_shape, self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self._adaptations = [dict(r) for r in state["adaptations"]]
        self._timeline = [dict(r) for r in state["timeline"]]
        self.driver.set_position(state["clock"]["global_step"], state["clock"]["epoch"])
        self.accuracy_history = list(state.get("accuracy_history", []))  # absent in older checkpoints
        self._flops_cache = None


__all__ = ["Growth", "KasminaLayer", "Morphogenesis", "group_name", "seed_sites"]
