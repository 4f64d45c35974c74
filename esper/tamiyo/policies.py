"""Which policy a controller runs: ``heuristic``, ``random`` or ``gnn`` (`PolicySettings.policy`).

The random and GNN policies import torch-geometric; they are imported only when chosen, so a
heuristic Tamiyo starts as fast as before.
"""

from __future__ import annotations

from typing import Any

from esper.tamiyo.heuristic import HeuristicPolicy
from esper.tamiyo.policy import Policy, RailsConfig

POLICY_KINDS = ("heuristic", "random", "gnn")


def build_policy(settings: Any, rails: RailsConfig, host_flops: float, loaded: Any = None) -> Policy:
    """The policy `settings.policy` names (see `esper.tamiyo.settings.PolicySettings`)."""
    kind = settings.policy
    if kind == "heuristic":
        return HeuristicPolicy(settings.heuristic(), rails, host_flops)
    if kind == "random":
        from esper.tamiyo.exploration import GrowthSpace, RandomPolicy

        return RandomPolicy(rails, seed=settings.random_seed, space=GrowthSpace.of(settings))
    if kind == "gnn":
        from esper.tamiyo.exploration import GrowthSpace
        from esper.tamiyo.gnn_policy import GNNPolicy
        from esper.tamiyo.policy_source import load_policy_ref

        if loaded is None:
            if not settings.policy_path:
                raise ValueError("policy is gnn but policy_path is empty; expected the directory of a policy written "
                                 "by esper-tamiyo-train or urza://HOST:PORT/NAME[@VERSION]")
            loaded = load_policy_ref(settings.policy_path)
        return GNNPolicy(loaded, rails, GrowthSpace.of(settings))
    raise ValueError(f"policy {kind!r} is unknown; expected one of {list(POLICY_KINDS)}")
