"""Exploration policies: uniformly random over legal actions, and epsilon-greedy around another policy.

Both choose among the same legal actions a learned policy sees (`esper.tamiyo.graph`: wait, cull
a live seed, grow a free site within the budget left by a branch blueprint, by width units or by
a block, as the run's growth modes allow), and record
the probability they gave the action they returned (`probability_of[decision_id]`) so field
reports can carry it for off-policy corrections. They are seeded and deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from esper.kasmina.growth.config import GrowthConfig
from esper.tamiyo.graph import CULL, FIRST_GROW, WAIT, catalog_blueprints, graph_to_data, width_column
from esper.tamiyo.policy import (
    Action,
    AdaptationDecision,
    ModelGraphState,
    Policy,
    RailsConfig,
    make_decision,
    wait,
)
from esper.v1 import common_pb2

RANDOM_VERSION = "random/1"


@dataclass(frozen=True)
class GrowthSpace:
    """What a run lets a policy grow: blueprints (empty: all) and the run's growth config (modes,
    size of a width seed)."""

    blueprints: tuple[str, ...] = ()
    growth: GrowthConfig = field(default_factory=GrowthConfig)

    @classmethod
    def of(cls, cfg: Any) -> GrowthSpace:
        """From anything with `blueprints` and `growth` (PolicySettings, HeuristicConfig)."""
        return cls(tuple(cfg.blueprints), cfg.growth)

    def graph(self, state: ModelGraphState, rails: RailsConfig):
        """`graph_to_data` of `state` under this space and the rails' budgets."""
        return graph_to_data(state, parameter_budget=rails.parameter_budget, compute_budget=rails.compute_budget,
                             allowed_blueprints=self.blueprints, growth=self.growth)


# What a run allows unless its config says more (growth.modes defaults to branch only).
BRANCH_ONLY = GrowthSpace()


def legal_actions(state: ModelGraphState, rails: RailsConfig, space: GrowthSpace
                  ) -> tuple[list[tuple[int, int]], list[int]]:
    """(node index, action column) of every legal non-wait action, in node then column order, and
    the units grow:width adds at each node."""
    data = space.graph(state, rails)
    mask = data.mask.clone()
    mask[:, WAIT] = False
    return [(int(i), int(a)) for i, a in mask.nonzero().tolist()], list(data.width_units)


def decision_for(state: ModelGraphState, node: int, column: int, reason: str, version: str,
                 confidence: float, width_units: int = 0) -> AdaptationDecision:
    """The AdaptationDecision of action `column` at node index `node` (`width_units`: the units a
    grow:width there adds)."""
    n = state.nodes[node]
    where = {"layer": n.layer_name, "seed": n.seed.seed_index, "confidence": confidence}
    if column == CULL:
        return make_decision(Action.DECISION_ACTION_CULL, reason, version, **where)
    bps = catalog_blueprints()
    width = width_column(bps)
    if column == width:
        if width_units < 1:
            raise ValueError(f"grow:width at node {node} needs width_units >= 1, got {width_units}")
        return make_decision(Action.DECISION_ACTION_GERMINATE, reason, version, **where,
                             growth_mode=common_pb2.GROWTH_MODE_WIDTH, growth_units=width_units)
    if column == width + 1:
        return make_decision(Action.DECISION_ACTION_GERMINATE, reason, version, **where,
                             growth_mode=common_pb2.GROWTH_MODE_DEPTH)
    return make_decision(Action.DECISION_ACTION_GERMINATE, reason, version, **where,
                         blueprint=bps[column - FIRST_GROW], growth_mode=common_pb2.GROWTH_MODE_BRANCH)


def action_kind(column: int, width: int) -> str:
    """cull, branch, width or depth: the group a column belongs to (`width`: the grow:width column)."""
    if column == CULL:
        return "cull"
    return "width" if column == width else "depth" if column == width + 1 else "branch"


def _by_kind(legal: list[tuple[int, int]]) -> dict[str, list[tuple[int, int]]]:
    width = width_column()
    groups: dict[str, list[tuple[int, int]]] = {}
    for action in legal:
        groups.setdefault(action_kind(action[1], width), []).append(action)
    return groups


class RandomPolicy:
    """Waits with probability `wait_probability`, else picks a kind of action uniformly among those
    with a legal action (cull, branch, width, depth) and then one of its legal actions uniformly, so
    width and depth growth (one action per site) are tried as often as branches (one per blueprint)."""

    version = RANDOM_VERSION

    def __init__(self, rails: RailsConfig, seed: int = 0, wait_probability: float = 0.5,
                 space: GrowthSpace = BRANCH_ONLY) -> None:
        if not 0.0 <= wait_probability <= 1.0:
            raise ValueError(f"wait_probability must be in [0, 1], got {wait_probability}")
        self.rails = rails
        self.seed = seed
        self.wait_probability = wait_probability
        self.space = space
        self.rng = random.Random(seed)
        self.probability_of: dict[str, float] = {}

    def action_probability(self, state: ModelGraphState, node: int | None, column: int) -> float:
        """Probability this policy gives an action (node None for WAIT) in `state`."""
        legal, _units = legal_actions(state, self.rails, self.space)
        if not legal:
            return 1.0 if node is None else 0.0
        if node is None:
            return self.wait_probability
        if (node, column) not in legal:
            return 0.0
        groups = _by_kind(legal)
        group = groups[action_kind(column, width_column())]
        return (1.0 - self.wait_probability) / len(groups) / len(group)

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        legal, units = legal_actions(state, self.rails, self.space)
        if not legal or self.rng.random() < self.wait_probability:
            d = wait("random: wait" if legal else "random: no legal action", self.version)
            self.probability_of[d.decision_id] = self.wait_probability if legal else 1.0
            return [d]
        groups = _by_kind(legal)
        kinds = sorted(groups)
        kind = kinds[self.rng.randrange(len(kinds))]
        node, column = groups[kind][self.rng.randrange(len(groups[kind]))]
        p = (1.0 - self.wait_probability) / len(kinds) / len(groups[kind])
        d = decision_for(state, node, column, f"random: {kind}, one of {len(groups[kind])} legal {kind} actions "
                         f"({len(legal)} legal in all)", self.version, p, units[node])
        self.probability_of[d.decision_id] = p
        return [d]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng_state = state["rng"]
        # JSON round trips turn the inner tuple into a list.
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))


class EpsilonGreedyPolicy:
    """With probability epsilon a `RandomPolicy` decision, else the wrapped policy's."""

    def __init__(self, greedy: Policy, explore: RandomPolicy, epsilon: float, seed: int = 0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.greedy = greedy
        self.explore = explore
        self.epsilon = epsilon
        self.rng = random.Random(seed + 7919)
        self.version = f"epsilon-greedy/{epsilon:g}/{greedy.version}"
        self.probability_of: dict[str, float] = {}

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        greedy = self.greedy.decide(state)
        explore_now = self.rng.random() < self.epsilon
        chosen = self.explore.decide(state) if explore_now else greedy
        d = chosen[0]
        node, column = locate_action(state, d)
        p_random = self.explore.action_probability(state, node, column)
        g = greedy[0]
        same = (g.action == d.action and g.layer_name == d.layer_name and g.seed_index == d.seed_index
                and g.blueprint_id == d.blueprint_id and g.growth_mode == d.growth_mode)
        self.probability_of[d.decision_id] = self.epsilon * p_random + (1.0 - self.epsilon) * (1.0 if same else 0.0)
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"greedy": self.greedy.state_dict(), "explore": self.explore.state_dict(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.greedy.load_state_dict(state["greedy"])
        self.explore.load_state_dict(state["explore"])
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))


def locate_action(state: ModelGraphState, d: AdaptationDecision) -> tuple[int | None, int]:
    """(node index, action column) of a decision; (None, WAIT) for a wait or an unknown slot."""
    if d.action not in (Action.DECISION_ACTION_GERMINATE, Action.DECISION_ACTION_CULL):
        return None, WAIT
    for i, n in enumerate(state.nodes):
        if n.layer_name == d.layer_name and n.seed.seed_index == d.seed_index:
            if d.action == Action.DECISION_ACTION_CULL:
                return i, CULL
            bps = catalog_blueprints()
            if d.growth_mode == common_pb2.GROWTH_MODE_WIDTH:
                return i, width_column(bps)
            if d.growth_mode == common_pb2.GROWTH_MODE_DEPTH:
                return i, width_column(bps) + 1
            if d.blueprint_id in bps:
                return i, FIRST_GROW + bps.index(d.blueprint_id)
    return None, WAIT

