"""The controller interface: `decide(ModelGraphState) -> list[AdaptationDecision]`.

Messages are the `esper.v1` protobufs, so the same policy object runs in-process (Tolaria calls it
directly) or behind the TamiyoService gRPC server without translation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from esper.kasmina.growth.config import GrowthConfig
from esper.v1 import common_pb2

ModelGraphState = common_pb2.ModelGraphState
AdaptationDecision = common_pb2.AdaptationDecision
Action = common_pb2.DecisionAction


class Policy(Protocol):
    """What every Tamiyo policy implements."""

    version: str

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        """Decisions for this epoch boundary (possibly a single WAIT)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


@dataclass
class RailsConfig:
    """Safety rails applied to every policy's decisions."""

    cooldown_epochs: int = 1
    max_concurrent: int = 1
    max_adaptations: int = 8
    # Growth budgets as multiples of the host: extra parameters, extra forward FLOPs per sample.
    parameter_budget: float = 1.0
    compute_budget: float = 1.0


@dataclass
class HeuristicConfig:
    """Knobs of the heuristic policy."""

    start_epoch: int = 1
    plateau_window: int = 2
    plateau_threshold: float = 0.01
    grow_without_plateau: bool = False
    # Blueprints to choose from (empty: every catalog blueprint that fits the site).
    blueprints: tuple[str, ...] = ()
    # Growth modes to choose from (growth.modes) and the size of a width seed (growth.width_units,
    # or growth.width_factor x the current units when width_units is 0).
    growth: GrowthConfig = field(default_factory=GrowthConfig)


def make_decision(action: int, reason: str, version: str, layer: str = "", seed: int = 0,
                  blueprint: str = "", confidence: float = 1.0, growth_mode: int = 0,
                  growth_units: int = 0) -> AdaptationDecision:
    """An AdaptationDecision with a fresh id."""
    return AdaptationDecision(
        decision_id=uuid.uuid4().hex, action=action, layer_name=layer, seed_index=seed,
        blueprint_id=blueprint, confidence=confidence, reason=reason, policy_version=version,
        growth_mode=growth_mode, growth_units=growth_units,
    )


def wait(reason: str, version: str) -> AdaptationDecision:
    return make_decision(Action.DECISION_ACTION_WAIT, reason, version)
