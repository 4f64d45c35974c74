"""Blueprint costs at a graph node and the growth budget left, shared by policies and rails."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from esper.tamiyo.policy import RailsConfig
from esper.v1 import common_pb2


@dataclass(frozen=True)
class SiteCost:
    blueprint_id: str
    parameters: int
    flops: int
    order: int  # catalog position, for stable tie-breaks


def chunk_shape(node: common_pb2.GraphNode) -> list[int]:
    """Shape of one seed's chunk at a node: the output shape with C replaced by the chunk size."""
    dims = list(node.output_shape.dims)
    return [-1, int(node.seed.chunk_size), *dims[2:]]


def blueprint_costs_at(node: common_pb2.GraphNode, allowed: Sequence[str] = ()) -> list[SiteCost]:
    """Cost of every allowed catalog blueprint that fits the node (invalid ones are skipped)."""
    from esper.kasmina.blueprints import CATALOG, BlueprintError, blueprint_cost

    out = []
    for order, (bid, spec) in enumerate(CATALOG.items()):
        if allowed and bid not in allowed:
            continue
        try:
            cost = blueprint_cost(spec, int(node.seed.chunk_size), chunk_shape(node))
        except (BlueprintError, ValueError):
            continue
        out.append(SiteCost(bid, int(cost.parameter_count), int(cost.flops_per_sample), order))
    return out


def cost_of(node: common_pb2.GraphNode, blueprint_id: str) -> SiteCost | None:
    found = blueprint_costs_at(node, (blueprint_id,))
    return found[0] if found else None


def budget_left(signals: common_pb2.TrainingSignals, rails: RailsConfig, host_flops: float) -> tuple[float, float]:
    """(parameters, forward FLOPs per sample) still allowed, from the budget fractions in `signals`."""
    params = signals.parameter_budget_left * rails.parameter_budget * signals.initial_parameter_count
    flops = signals.compute_budget_left * rails.compute_budget * host_flops
    return params, flops
