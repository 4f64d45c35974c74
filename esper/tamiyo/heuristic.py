"""The heuristic Tamiyo policy: grow on a plateau, at the least healthy site, by gain per FLOP.

1. Wait until `start_epoch`, and (unless `grow_without_plateau`) until validation loss plateaus:
   its relative improvement over the last `plateau_window` epochs is below `plateau_threshold`.
2. Where: among DORMANT, non-embargoed seed slots, when width growth is allowed, the *least grown*
   site that can be widened first (units now / units when the policy first saw it), so repeated
   width steps scale the host's layers together and keep the proportions its designer chose, as a
   static model of the same size has them; among equally grown sites a *bottleneck* first -- a
   *narrow* layer (fewer units than both the features each unit reads and writes: it limits every
   layer after it) before a *saturated* one (at least half its units dead). Then, and whenever
   width growth is not allowed, the worst health from telemetry: need = gradient norm relative to
   the mean over candidate sites (the loss is most sensitive there) + dead fraction (capacity the
   host has lost there). Ties go to the shallower site. History, measured on MNIST-1D with width
   merged at once: ranked by health alone, width growth piled every unit into the MLP's last
   hidden layer; narrow-first (heuristic/3) widened the CNN's middle conv 8 -> 16 -> 32 while the
   first conv (1 x 3 patches, never narrow by the rank test) stayed at 8; least grown among
   bottlenecks only still left the first conv at 8 in 7 of 20 runs; least grown first (heuristic/4)
   grew 16/18/16 in 20 of 20 (benchmarks/results/growth_pareto_mnist1d_cnn_ablations.md).
3. How (growth mode) and what: the options allowed by `growth.modes` that fit the budget left --
   the largest blueprint ("branch", the rule from before growth modes), `growth.width_units` (or
   `width_factor` x the current units, shrunk to fit the budget) new units ("width"), one identity
   block after the site ("depth") -- are scored by expected gain per FLOP, with the prior
   gain = need x sqrt(added parameters) (returns diminish with size; it is a prior, not a
   measurement). Width is chosen outright where the telemetry shows the layer is a bottleneck
   that no branch on its output can fix: *narrow* (fewer units than both the features each unit
   reads and writes) or *saturated* (at least half its units dead).
The safety rails (`esper.tamiyo.rails`) then apply cooldown, concurrency and budget limits.
"""

from __future__ import annotations

import math
from typing import Any

from esper.kasmina.growth.config import units_to_add
from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.costs import SiteCost, budget_left, growth_options
from esper.tamiyo.policy import (
    Action,
    AdaptationDecision,
    HeuristicConfig,
    ModelGraphState,
    RailsConfig,
    make_decision,
    wait,
)
from esper.v1 import common_pb2

VERSION = "heuristic/4"
MODE_ENUM = {"branch": common_pb2.GROWTH_MODE_BRANCH, "width": common_pb2.GROWTH_MODE_WIDTH,
             "depth": common_pb2.GROWTH_MODE_DEPTH}
SATURATED_DEAD_FRACTION = 0.5


def plateau(history: list[float], window: int, threshold: float) -> tuple[bool, float]:
    """(is plateau, relative improvement) of the last `window` epochs of validation loss."""
    if len(history) < window + 1:
        return False, float("nan")
    before, now = history[-window - 1], history[-1]
    improvement = (before - now) / max(abs(before), 1e-12)
    return improvement < threshold, improvement


class HeuristicPolicy:
    """Plateau + bottleneck + worst health + budget. Its state: a decision counter and the units
    each width site had when first seen (for the least-grown rule); both are checkpointed."""

    version = VERSION

    def __init__(self, cfg: HeuristicConfig, rails: RailsConfig, host_flops_per_sample: float) -> None:
        self.cfg = cfg
        self.rails = rails
        self.host_flops = host_flops_per_sample
        self.decisions_made = 0
        self.initial_units: dict[str, int] = {}

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        sig = state.signals
        if sig.epoch < self.cfg.start_epoch:
            return [wait(f"epoch {sig.epoch} < start_epoch {self.cfg.start_epoch}", VERSION)]
        is_plateau, improvement = plateau(list(sig.val_loss_history), self.cfg.plateau_window,
                                          self.cfg.plateau_threshold)
        if not (is_plateau or self.cfg.grow_without_plateau):
            text = "not enough history" if improvement != improvement else f"val loss improved {improvement:.2%}"
            return [wait(f"no plateau: {text} over {self.cfg.plateau_window} epochs "
                         f"(threshold {self.cfg.plateau_threshold:.2%})", VERSION)]
        for n in state.nodes:
            if n.HasField("width") and n.width.units > 0:
                self.initial_units.setdefault(n.layer_name, int(n.width.units))
        candidates = [n for n in state.nodes if n.seed.state == S.DORMANT and n.seed.embargo_epochs_left == 0]
        if not candidates:
            return [wait("no dormant seed slot available", VERSION)]
        grads = [n.seed.telemetry.gradient_norm for n in candidates]
        mean_grad = sum(grads) / len(grads) if grads else 0.0

        def need(node) -> float:
            t = node.seed.telemetry
            rel = t.gradient_norm / mean_grad if mean_grad > 0 else 0.0
            return rel + t.dead_fraction

        def narrow(node) -> bool:
            # A bottleneck only width growth can fix: the layer limits every layer after it, so
            # it is widened before any other site, whatever the health signals say elsewhere.
            w = node.width
            return ("width" in self.cfg.growth.modes and node.HasField("width") and w.units > 0
                    and w.units < min(w.input_dim, w.output_dim))

        def saturated(node) -> bool:
            return ("width" in self.cfg.growth.modes and node.HasField("width") and node.width.units > 0
                    and node.seed.telemetry.dead_fraction >= SATURATED_DEAD_FRACTION)

        def grown(node) -> float:
            if "width" not in self.cfg.growth.modes or not node.HasField("width") or node.width.units <= 0:
                return 1.0
            # The trainer reports each pair's first width; a client that does not (0) relies on
            # the units this policy saw first.
            first = node.width.initial_units or self.initial_units.get(node.layer_name, node.width.units)
            return node.width.units / max(1, first)

        params_left, flops_left = budget_left(sig, self.rails, self.host_flops)
        why = "plateau" if is_plateau else "growth forced by config"
        def widenable(node) -> bool:
            return "width" in self.cfg.growth.modes and node.HasField("width") and node.width.available

        order = sorted(candidates, key=lambda n: (not widenable(n), grown(n), not (narrow(n) or saturated(n)),
                                                  not narrow(n), -need(n), n.depth, n.seed.seed_index))
        for node in order:
            choice = self._choose(node, need(node), params_left, flops_left)
            if choice is None:
                continue
            mode, cost, units, because = choice
            self.decisions_made += 1
            t = node.seed.telemetry
            what = {"width": f"{units} new units", "depth": "a new block"}.get(mode, cost.blueprint_id)
            return [make_decision(
                Action.DECISION_ACTION_GERMINATE,
                f"{why}; site {node.layer_name}[{node.seed.seed_index}] "
                f"{_where(widenable(node), narrow(node), saturated(node), grown(node))} "
                f"(grad norm {t.gradient_norm:.3g}, dead {t.dead_fraction:.1%}); {mode}: {what} "
                f"({because}) adds {cost.parameters} params, {cost.flops} FLOPs/sample "
                f"(budget left {params_left:.0f} params, {flops_left:.0f} FLOPs)",
                VERSION, layer=node.layer_name, seed=node.seed.seed_index,
                blueprint=cost.blueprint_id if mode == "branch" else "",
                confidence=min(1.0, 0.5 + 0.5 * need(node) / max(1.0, len(candidates))),
                growth_mode=MODE_ENUM[mode],
                growth_units=units,
            )]
        return [wait(f"{why}, but no growth option fits the budget left "
                     f"({params_left:.0f} params, {flops_left:.0f} FLOPs/sample)", VERSION)]

    def _choose(self, node, need: float, params_left: float, flops_left: float
                ) -> tuple[str, SiteCost, int, str] | None:
        """(mode, cost, units, why) of the best option at `node`, or None if nothing fits."""
        wanted = 0
        if node.HasField("width") and node.width.units > 0:
            wanted = units_to_add(self.cfg.growth, int(node.width.units))
        options = [o for o in growth_options(node, self.cfg.growth.modes, self.cfg.blueprints, wanted,
                                             params_left, flops_left) if o.cost.flops > 0]
        branches = [o for o in options if o.mode == "branch"]
        if branches:
            # Among branches, the largest that fits (heuristic/1's rule, which the MNIST-1D benchmark
            # measured; a gain-per-FLOP prior picked squeeze-excitation there and did worse).
            largest = max(branches, key=lambda o: (o.cost.parameters, -o.cost.order))
            options = [o for o in options if o.mode != "branch"] + [largest]
        if not options:
            return None
        width = next((o for o in options if o.mode == "width"), None)
        if width is not None:
            w = node.width
            if w.units < min(w.input_dim, w.output_dim):
                return "width", width.cost, width.units, f"narrow: {w.units} units < min({w.input_dim} in, {w.output_dim} out)"
            if node.seed.telemetry.dead_fraction >= SATURATED_DEAD_FRACTION:
                return ("width", width.cost, width.units,
                        f"saturated: {node.seed.telemetry.dead_fraction:.0%} of its units dead")

        def score(o) -> float:
            return need * math.sqrt(o.cost.parameters) / o.cost.flops

        best = max(options, key=lambda o: (score(o), o.mode == "width", -o.cost.order))
        return best.mode, best.cost, best.units, f"best expected gain per FLOP ({score(best):.3g})"

    def state_dict(self) -> dict[str, Any]:
        return {"decisions_made": self.decisions_made, "initial_units": dict(self.initial_units)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decisions_made = int(state["decisions_made"])
        # Checkpoints of heuristic/3 have no initial units: sites then count as not grown yet.
        self.initial_units = {str(k): int(v) for k, v in state.get("initial_units", {}).items()}


def _where(widenable: bool, narrow: bool, saturated: bool, grown: float) -> str:
    """Why the site was chosen, for the decision's reason."""
    if not widenable:
        return "has the worst health"
    kind = ("the narrowest bottleneck" if narrow else "a saturated bottleneck" if saturated
            else "a layer")
    return f"is {kind} (least grown: {grown:.2g}x its first width)"
