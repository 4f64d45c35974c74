"""`LifecycleDriver`: runs the lifecycle gates of every seed site at step and epoch boundaries.

    driver = LifecycleDriver(model, LifecycleConfig(...), evaluate=validation_score)
    for epoch in range(E):
        for batch in loader:
            loss.backward(); optimizer.step()
            driver.step()                       # one ops.lifecycle_advance_ per live layer + step gates
        driver.end_epoch()                      # embargoes, timeouts, counterfactual gates

`evaluate()` returns a validation score where higher is better (accuracy, or minus the loss); the
driver calls it once for the baseline and once per seed under `layer.seed_disabled(i)`, so the
contribution of a seed is `score(with seed) - score(alpha forced to 0)`. It must not train.
With a `counterfactual` (esper.kasmina.counterfactual.RefitCounterfactual) both scores are taken
after the same short host refit instead, so co-adaptation of the host is not credited to a seed.
Every transition is a LifecycleEvent, kept in `driver.events` and sent to listeners.

`can_finish(steps_left, steps_per_epoch)` says whether a seed germinated now can reach a verdict
(FOSSILIZED or CULLED by its contribution) before the run ends; a germination that cannot would
only add unproven parameters to the final model, so callers refuse it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from torch import nn

from esper.kasmina.counterfactual import RefitCounterfactual
from esper.kasmina.layer import KasminaLayer, LifecycleClock
from esper.kasmina.lifecycle import (
    LifecycleConfig,
    LifecycleEvent,
    LifecycleListener,
    contribution_gate,
    min_lifecycle_epochs,
    needs_contribution,
    step_gate,
    training_gate,
)
from esper.kasmina.wrap import seed_sites
from esper.lifecycle import SeedLifecycleState as S


class LifecycleDriver:
    """Owns the lifecycle config and clock; advances and gates all seed sites of a model."""

    def __init__(
        self,
        model: nn.Module,
        config: LifecycleConfig | None = None,
        evaluate: Callable[[], float] | None = None,
        listeners: Iterable[LifecycleListener] = (),
        min_contribution_per_site: dict[str, float] | None = None,
        counterfactual: RefitCounterfactual | None = None,
        germination_grace: Callable[[str, int], int] | None = None,
    ) -> None:
        self.model = model
        self.config = config or LifecycleConfig()
        self.evaluate = evaluate
        self.counterfactual = counterfactual
        # Sites that must clear a different contribution threshold than config.min_contribution
        # (the argument, when given, replaces config.min_contribution_per_site).
        self.min_contribution_per_site = dict(self.config.min_contribution_per_site if min_contribution_per_site is None
                                              else min_contribution_per_site)
        self.clock = LifecycleClock()
        # Extra epochs a GERMINATED seed may wait, e.g. the epochs the kernel's compiler was down
        # (from a controller that knows; (site name, seed index) -> epochs).
        self.germination_grace = germination_grace
        self.events: list[LifecycleEvent] = []
        self._listeners = list(listeners)
        self.sites: list[tuple[str, KasminaLayer]] = []
        self.refresh_sites()
        if not self.sites:
            raise ValueError("the model has no seed sites; call esper.kasmina.wrap(model, ...) first")
        unknown = sorted(set(self.min_contribution_per_site) - {name for name, _ in self.sites})
        if unknown:
            raise ValueError(f"min_contribution_per_site names {unknown}, which are not seed sites; "
                             f"expected some of {[name for name, _ in self.sites]}")

    @property
    def global_step(self) -> int:
        return self.clock.global_step

    @property
    def epoch(self) -> int:
        return self.clock.epoch

    def set_position(self, global_step: int, epoch: int) -> None:
        """Set the clock (e.g. after resuming from a checkpoint)."""
        self.clock.global_step = int(global_step)
        self.clock.epoch = int(epoch)

    def refresh_sites(self) -> None:
        """Re-scan the model for seed sites (after wrapping more layers) and attach to them."""
        self.sites = seed_sites(self.model)
        for _, layer in self.sites:
            layer.clock = self.clock
            layer.embargo_epochs = self.config.embargo_epochs
            layer.dead_threshold = self.config.dead_threshold
            if self._record not in layer._listeners:
                layer.add_listener(self._record)

    def add_listener(self, listener: LifecycleListener) -> None:
        """Call `listener(event)` on every transition of every site."""
        self._listeners.append(listener)

    def _record(self, event: LifecycleEvent) -> None:
        self.events.append(event)
        for listener in self._listeners:
            listener(event)

    def site(self, name: str) -> KasminaLayer:
        for n, layer in self.sites:
            if n == name:
                return layer
        raise KeyError(f"no seed site {name!r}; sites are {[n for n, _ in self.sites]}")

    def step(self) -> list[LifecycleEvent]:
        """After each optimizer step: advance every live table once and apply the step gates."""
        self.clock.global_step += 1
        cfg = self.config
        start = len(self.events)
        for _, layer in self.sites:
            if layer.num_live_slots == 0:
                continue
            layer.advance(cfg.alpha_step)
            for i in range(layer.num_seeds):
                state = layer.state_of(i)
                steps = layer.steps_in_state(i)
                decision = None
                if state == S.TRAINING:
                    due = steps >= cfg.training_min_steps and (
                        (steps - cfg.training_min_steps) % cfg.gate_interval_steps == 0
                        or steps >= cfg.training_max_steps
                    )
                    if due:
                        decision = training_gate(steps, layer.read_alignment(i), cfg)
                elif state in (S.GRAFTING, S.STABILIZATION):
                    decision = step_gate(state, steps, cfg)
                if decision is not None:
                    layer.transition(i, decision.to_state, decision.reason)
        return self.events[start:]

    def site_config(self, name: str) -> LifecycleConfig:
        """The lifecycle config that gates the seeds of site `name` (its own contribution threshold)."""
        if name not in self.min_contribution_per_site:
            return self.config
        return dataclasses.replace(self.config, min_contribution=self.min_contribution_per_site[name])

    def end_epoch(self, baseline: float | None = None) -> list[LifecycleEvent]:
        """At each epoch boundary: epoch counters, embargoes, germination timeouts, contribution gates.

        `baseline` is this epoch's validation score with every seed as it is, when the caller has it
        already; otherwise it is measured with `evaluate` (only if some seed needs a measurement).
        """
        cfg = self.config
        start = len(self.events)
        for name, layer in self.sites:
            layer.end_epoch()
            for i in range(layer.num_seeds):
                if not cfg.germination_timeout_epochs or layer.state_of(i) != S.GERMINATED:
                    continue
                grace = self.germination_grace(name, i) if self.germination_grace is not None else 0
                if layer.epochs_in_state(i) >= cfg.germination_timeout_epochs + grace:
                    layer.cancel(i, f"no kernel arrived within {cfg.germination_timeout_epochs} epoch(s)"
                                    + (f" (+{grace} while its services were down)" if grace else ""))
        pending = [
            (layer, i, site_cfg)
            for name, layer in self.sites
            for site_cfg in (self.site_config(name),)
            for i in range(layer.num_seeds)
            if needs_contribution(layer.state_of(i), layer.epochs_in_state(i), site_cfg)
        ]
        if pending and self.counterfactual is not None:
            with_seeds = self.counterfactual.score_with()
            for layer, i, site_cfg in pending:
                contribution = with_seeds - self.counterfactual.score_without(layer, i)
                self._gate_contribution(layer, i, contribution, site_cfg)
        elif pending:
            if self.evaluate is None:
                raise RuntimeError(
                    "seeds need a counterfactual measurement but the LifecycleDriver has no evaluate callable; "
                    "pass evaluate=<function returning a validation score, higher is better>"
                )
            if baseline is None:
                baseline = float(self.evaluate())
            for layer, i, site_cfg in pending:
                with layer.seed_disabled(i):
                    without = float(self.evaluate())
                self._gate_contribution(layer, i, baseline - without, site_cfg)
        self.clock.epoch += 1
        return self.events[start:]

    @staticmethod
    def _gate_contribution(layer: KasminaLayer, i: int, contribution: float, site_cfg: LifecycleConfig) -> None:
        layer.record_contribution(i, contribution)
        decision = contribution_gate(layer.state_of(i), layer.epochs_in_state(i), contribution, site_cfg)
        if decision is not None:
            layer.transition(i, decision.to_state, decision.reason)

    def can_finish(self, steps_left: int, steps_per_epoch: int) -> bool:
        """Whether a seed germinated at this epoch boundary can reach its verdict within
        `steps_left` optimizer steps (the fastest path through every gate)."""
        return steps_left >= min_lifecycle_epochs(self.config, steps_per_epoch) * max(1, steps_per_epoch)

    def seed_table(self) -> list:
        """Rows of every site's seed table (one device read per site)."""
        return [row for _, layer in self.sites for row in layer.seed_table()]
