"""Costs of growth options at a graph node (blueprints, width units) and the budget left, shared
by policies and rails."""

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


def width_cost(node: common_pb2.GraphNode, units: int) -> SiteCost | None:
    """Cost of adding `units` units at the node's width pair (None: no width growth possible there)."""
    w = node.width
    if not node.HasField("width") or w.units <= 0 or not w.available or units < 1:
        return None
    return SiteCost("width", int(units * w.unit_parameters), int(units * w.unit_flops), -1)


def units_that_fit(node: common_pb2.GraphNode, wanted: int, params_left: float, flops_left: float) -> int:
    """The largest number of units <= `wanted` whose cost fits the budget left (0 if none)."""
    w = node.width
    limits = [wanted]
    if w.unit_parameters > 0:
        limits.append(int(params_left // w.unit_parameters))
    if w.unit_flops > 0:
        limits.append(int(flops_left // w.unit_flops))
    return max(0, min(limits))


def depth_cost(node: common_pb2.GraphNode) -> SiteCost | None:
    """Cost of one more block after the node (None: no depth growth possible there)."""
    d = node.deepen
    if not node.HasField("deepen") or not d.available:
        return None
    return SiteCost("depth", int(d.block_parameters), int(d.block_flops), -2)


def decision_cost(node: common_pb2.GraphNode, decision: common_pb2.AdaptationDecision) -> SiteCost | None:
    """What a germination decision costs at its node, whatever its growth mode."""
    if decision.growth_mode == common_pb2.GROWTH_MODE_WIDTH:
        return width_cost(node, int(decision.growth_units))
    if decision.growth_mode == common_pb2.GROWTH_MODE_DEPTH:
        return depth_cost(node)
    return cost_of(node, decision.blueprint_id)


@dataclass(frozen=True)
class GrowthOption:
    """One germination a policy may choose at a node: growth mode x blueprint (branch) or units
    (width), with its cost. The action space of every Tamiyo policy."""

    mode: str  # "branch", "width" or "depth"
    cost: SiteCost
    units: int = 0  # width: units to add

    @property
    def growth_mode(self) -> int:
        return {"branch": common_pb2.GROWTH_MODE_BRANCH, "width": common_pb2.GROWTH_MODE_WIDTH,
                "depth": common_pb2.GROWTH_MODE_DEPTH}[self.mode]

    def decision_fields(self) -> dict:
        """Keyword arguments of `esper.tamiyo.policy.make_decision` for this option."""
        return {"blueprint": self.cost.blueprint_id if self.mode == "branch" else "",
                "growth_mode": self.growth_mode, "growth_units": self.units}


def growth_options(node: common_pb2.GraphNode, modes: Sequence[str], blueprints: Sequence[str],
                   width_units: int, params_left: float, flops_left: float) -> list[GrowthOption]:
    """Every option of the allowed `modes` that fits the budget left at `node`.

    branch: each allowed blueprint that fits the site; width: `width_units` new units shrunk to the
    largest count that fits (absent when the site has no available width pair); depth: one block.
    """
    out: list[GrowthOption] = []
    if "branch" in modes:
        for c in blueprint_costs_at(node, blueprints):
            if c.parameters <= params_left and c.flops <= flops_left:
                out.append(GrowthOption("branch", c))
    if "width" in modes:
        units = units_that_fit(node, width_units, params_left, flops_left) if node.HasField("width") else 0
        cost = width_cost(node, units)
        if cost is not None:
            out.append(GrowthOption("width", cost, units))
    if "depth" in modes:
        cost = depth_cost(node)
        if cost is not None and cost.parameters <= params_left and cost.flops <= flops_left:
            out.append(GrowthOption("depth", cost))
    return out
