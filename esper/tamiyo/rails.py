"""Safety rails around any policy: cooldown, max concurrent adaptations, growth budgets.

A rail never invents an adaptation; it only turns a policy's GERMINATE into a WAIT that says
which rail held it back. Rails keep their own small state (last growth epoch, adaptation count)
which is checkpointed with the run.
"""

from __future__ import annotations

from typing import Any

from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.costs import budget_left, decision_cost
from esper.tamiyo.policy import Action, AdaptationDecision, ModelGraphState, Policy, RailsConfig, wait
from esper.v1 import common_pb2


class SafetyRails:
    """Filters decisions against the rails; see the module docstring."""

    def __init__(self, cfg: RailsConfig, host_flops_per_sample: float) -> None:
        self.cfg = cfg
        self.host_flops = host_flops_per_sample
        self.last_growth_epoch: int | None = None
        self.adaptations = 0
        # Decisions counted in `adaptations` that may still be given back (see `give_back`).
        self.counted: list[str] = []

    def filter(self, state: ModelGraphState, decisions: list[AdaptationDecision]) -> list[AdaptationDecision]:
        sig = state.signals
        nodes = {(n.layer_name, n.seed.seed_index): n for n in state.nodes}
        active = sig.active_adaptations
        params_left, flops_left = budget_left(sig, self.cfg, self.host_flops)
        out = []
        for d in decisions:
            if d.action != Action.DECISION_ACTION_GERMINATE:
                out.append(d)
                continue
            version = d.policy_version
            node = nodes.get((d.layer_name, d.seed_index))
            if node is None:
                out.append(wait(f"rail: no seed slot {d.layer_name}[{d.seed_index}]", version))
                continue
            if node.seed.state != S.DORMANT or node.seed.embargo_epochs_left > 0:
                out.append(wait(f"rail: slot {d.layer_name}[{d.seed_index}] is not free", version))
                continue
            if self.last_growth_epoch is not None and sig.epoch - self.last_growth_epoch < self.cfg.cooldown_epochs:
                out.append(wait(f"rail: cooldown ({sig.epoch - self.last_growth_epoch} < "
                                f"{self.cfg.cooldown_epochs} epochs since the last germination)", version))
                continue
            if active >= self.cfg.max_concurrent:
                out.append(wait(f"rail: {active} adaptations in flight (max_concurrent {self.cfg.max_concurrent})",
                                version))
                continue
            if self.adaptations >= self.cfg.max_adaptations:
                out.append(wait(f"rail: max_adaptations {self.cfg.max_adaptations} reached", version))
                continue
            cost = decision_cost(node, d)
            if cost is None:
                what = {common_pb2.GROWTH_MODE_WIDTH: "width growth", common_pb2.GROWTH_MODE_DEPTH: "depth growth"}.get(
                    d.growth_mode, f"blueprint {d.blueprint_id!r}")
                out.append(wait(f"rail: {what} does not fit {d.layer_name}", version))
                continue
            if cost.parameters > params_left or cost.flops > flops_left:
                out.append(wait(f"rail: {d.blueprint_id} ({cost.parameters} params, {cost.flops} FLOPs) "
                                f"exceeds the budget left ({params_left:.0f} params, {flops_left:.0f} FLOPs)",
                                version))
                continue
            out.append(d)
            active += 1
            params_left -= cost.parameters
            flops_left -= cost.flops
            self.last_growth_epoch = sig.epoch
            self.adaptations += 1
            if d.decision_id:
                self.counted.append(d.decision_id)
        return out

    def give_back(self, decision_id: str) -> bool:
        """Un-count a germination that was cancelled because a service was unavailable, so an
        outage does not use up max_adaptations. Only once per decision; False when unknown."""
        if decision_id not in self.counted:
            return False
        self.counted.remove(decision_id)
        self.adaptations = max(0, self.adaptations - 1)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last_growth_epoch": self.last_growth_epoch, "adaptations": self.adaptations,
                "counted": list(self.counted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_growth_epoch = state["last_growth_epoch"]
        self.adaptations = int(state["adaptations"])
        self.counted = [str(d) for d in state.get("counted", [])]


class Controller:
    """A policy behind the rails: what Tolaria calls at every epoch boundary."""

    def __init__(self, policy: Policy, rails: SafetyRails) -> None:
        self.policy = policy
        self.rails = rails

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        return self.rails.filter(state, self.policy.decide(state))

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "rails": self.rails.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.rails.load_state_dict(state["rails"])
