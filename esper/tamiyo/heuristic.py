"""The heuristic Tamiyo policy: grow on a plateau, at the least healthy site, within budget.

1. Wait until `start_epoch`, and (unless `grow_without_plateau`) until validation loss plateaus:
   its relative improvement over the last `plateau_window` epochs is below `plateau_threshold`.
2. Where: among DORMANT, non-embargoed seed slots, the one with the worst health from telemetry:
   need = gradient norm relative to the mean over candidate sites (the loss is most sensitive
   there) + dead fraction (capacity the host has lost there). Ties go to the shallower site.
3. What: among the allowed blueprints that fit the site's input kind and chunk size, the one with
   the most parameters whose parameter count and FLOPs fit the budget left.
The safety rails (`esper.tamiyo.rails`) then apply cooldown, concurrency and budget limits.
"""

from __future__ import annotations

from typing import Any

from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.costs import SiteCost, blueprint_costs_at, budget_left
from esper.tamiyo.policy import (
    Action,
    AdaptationDecision,
    HeuristicConfig,
    ModelGraphState,
    RailsConfig,
    make_decision,
    wait,
)

VERSION = "heuristic/1"


def plateau(history: list[float], window: int, threshold: float) -> tuple[bool, float]:
    """(is plateau, relative improvement) of the last `window` epochs of validation loss."""
    if len(history) < window + 1:
        return False, float("nan")
    before, now = history[-window - 1], history[-1]
    improvement = (before - now) / max(abs(before), 1e-12)
    return improvement < threshold, improvement


class HeuristicPolicy:
    """Plateau + worst health + budget. Stateless apart from a decision counter."""

    version = VERSION

    def __init__(self, cfg: HeuristicConfig, rails: RailsConfig, host_flops_per_sample: float) -> None:
        self.cfg = cfg
        self.rails = rails
        self.host_flops = host_flops_per_sample
        self.decisions_made = 0

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
        candidates = [n for n in state.nodes if n.seed.state == S.DORMANT and n.seed.embargo_epochs_left == 0]
        if not candidates:
            return [wait("no dormant seed slot available", VERSION)]
        grads = [n.seed.telemetry.gradient_norm for n in candidates]
        mean_grad = sum(grads) / len(grads) if grads else 0.0

        def need(node) -> float:
            t = node.seed.telemetry
            rel = t.gradient_norm / mean_grad if mean_grad > 0 else 0.0
            return rel + t.dead_fraction

        params_left, flops_left = budget_left(sig, self.rails, self.host_flops)
        why = "plateau" if is_plateau else "growth forced by config"
        for node in sorted(candidates, key=lambda n: (-need(n), n.depth, n.seed.seed_index)):
            costs = blueprint_costs_at(node, self.cfg.blueprints)
            fitting = [c for c in costs if c.parameters <= params_left and c.flops <= flops_left]
            if not fitting:
                continue
            best: SiteCost = max(fitting, key=lambda c: (c.parameters, -c.order))
            self.decisions_made += 1
            t = node.seed.telemetry
            return [make_decision(
                Action.DECISION_ACTION_GERMINATE,
                f"{why}; site {node.layer_name}[{node.seed.seed_index}] has the worst health "
                f"(grad norm {t.gradient_norm:.3g}, dead {t.dead_fraction:.1%}); {best.blueprint_id} "
                f"adds {best.parameters} params, {best.flops} FLOPs/sample "
                f"(budget left {params_left:.0f} params, {flops_left:.0f} FLOPs)",
                VERSION, layer=node.layer_name, seed=node.seed.seed_index, blueprint=best.blueprint_id,
                confidence=min(1.0, 0.5 + 0.5 * need(node) / max(1.0, len(candidates))),
            )]
        return [wait(f"{why}, but no blueprint fits the budget left "
                     f"({params_left:.0f} params, {flops_left:.0f} FLOPs/sample)", VERSION)]

    def state_dict(self) -> dict[str, Any]:
        return {"decisions_made": self.decisions_made}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decisions_made = int(state["decisions_made"])
