"""Exploration policies: uniformly random over legal actions, and epsilon-greedy around another policy.

Both choose among the same legal actions a learned policy sees (`esper.tamiyo.graph`: wait, cull
a live seed, grow with mode m and blueprint b at a free site within the budget left), and record
the probability they gave the action they returned (`probability_of[decision_id]`) so field
reports can carry it for off-policy corrections. They are seeded and deterministic for a seed.
"""

from __future__ import annotations

import random
from typing import Any

from esper.tamiyo.graph import CULL, FIRST_GROW, GROWTH_MODES, WAIT, catalog_blueprints, graph_to_data
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


def legal_actions(state: ModelGraphState, rails: RailsConfig, allowed: tuple[str, ...]) -> list[tuple[int, int]]:
    """(node index, action column) of every legal non-wait action, in node then column order."""
    data = graph_to_data(state, parameter_budget=rails.parameter_budget, compute_budget=rails.compute_budget,
                         allowed_blueprints=allowed)
    mask = data.mask.clone()
    mask[:, WAIT] = False
    return [(int(i), int(a)) for i, a in mask.nonzero().tolist()]


def decision_for(state: ModelGraphState, node: int, column: int, reason: str, version: str,
                 confidence: float) -> AdaptationDecision:
    """The AdaptationDecision of action `column` at node index `node`."""
    n = state.nodes[node]
    if column == CULL:
        return make_decision(Action.DECISION_ACTION_CULL, reason, version, layer=n.layer_name,
                             seed=n.seed.seed_index, confidence=confidence)
    bps = catalog_blueprints()
    mode_index, b_index = divmod(column - FIRST_GROW, len(bps))
    if GROWTH_MODES[mode_index] != "branch":  # pragma: no cover - only branch growth exists so far
        raise NotImplementedError(f"growth mode {GROWTH_MODES[mode_index]!r}")
    return make_decision(Action.DECISION_ACTION_GERMINATE, reason, version, layer=n.layer_name,
                         seed=n.seed.seed_index, blueprint=bps[b_index], confidence=confidence,
                         growth_mode=common_pb2.GROWTH_MODE_BRANCH)


class RandomPolicy:
    """Waits with probability `wait_probability`, else takes a uniformly random legal action."""

    version = RANDOM_VERSION

    def __init__(self, rails: RailsConfig, seed: int = 0, wait_probability: float = 0.5,
                 blueprints: tuple[str, ...] = ()) -> None:
        if not 0.0 <= wait_probability <= 1.0:
            raise ValueError(f"wait_probability must be in [0, 1], got {wait_probability}")
        self.rails = rails
        self.seed = seed
        self.wait_probability = wait_probability
        self.blueprints = tuple(blueprints)
        self.rng = random.Random(seed)
        self.probability_of: dict[str, float] = {}

    def action_probability(self, state: ModelGraphState, node: int | None, column: int) -> float:
        """Probability this policy gives an action (node None for WAIT) in `state`."""
        legal = legal_actions(state, self.rails, self.blueprints)
        if not legal:
            return 1.0 if node is None else 0.0
        if node is None:
            return self.wait_probability
        return (1.0 - self.wait_probability) / len(legal) if (node, column) in legal else 0.0

    def decide(self, state: ModelGraphState) -> list[AdaptationDecision]:
        legal = legal_actions(state, self.rails, self.blueprints)
        if not legal or self.rng.random() < self.wait_probability:
            d = wait("random: wait" if legal else "random: no legal action", self.version)
            self.probability_of[d.decision_id] = self.wait_probability if legal else 1.0
            return [d]
        node, column = legal[self.rng.randrange(len(legal))]
        p = (1.0 - self.wait_probability) / len(legal)
        d = decision_for(state, node, column, f"random: one of {len(legal)} legal actions", self.version, p)
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
                and g.blueprint_id == d.blueprint_id)
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
            if d.blueprint_id in bps:
                return i, FIRST_GROW + bps.index(d.blueprint_id)
    return None, WAIT

