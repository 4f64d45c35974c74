"""Which kernels to obtain before training: at each dormant site, the blueprint the heuristic
policy picks first there (the largest allowed one within the initial budget)."""

from __future__ import annotations

from collections.abc import Sequence

from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo.costs import blueprint_costs_at
from esper.v1 import common_pb2


def first_blueprints(state: common_pb2.ModelGraphState, blueprints: Sequence[str], params_left: float,
                     flops_left: float) -> list[tuple[str, str]]:
    """(layer name, blueprint id) per dormant node of `state` that some allowed blueprint fits
    within the budget left: the largest one (ties: the earlier in the catalog)."""
    out = []
    for node in state.nodes:
        if node.seed.state != S.DORMANT:
            continue
        fitting = [c for c in blueprint_costs_at(node, tuple(blueprints))
                   if c.parameters <= params_left and c.flops <= flops_left]
        if fitting:
            out.append((node.layer_name, max(fitting, key=lambda c: (c.parameters, -c.order)).blueprint_id))
    return out
