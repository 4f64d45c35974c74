"""Growth modes in a Tolaria run: width seeds next to the residual-branch seeds.

`RunGrowth` is what `Morphogenesis` asks about width growth: which sites can grow in width (the
`WidthSite` of each graph node), planting a width seed when the controller decides
GROWTH_MODE_WIDTH (its GradMax/TINY statistics pass runs on a few training batches and is counted
as growth FLOPs), merging fossilized width seeds into the host at the epoch boundary (the
optimizer's host group takes the merged parameters with their state), and the list of merges a
checkpoint needs to rebuild the grown host. Residual branches are untouched: they stay the
"branch" mode, handled by Kasmina's blueprints as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina import KasminaLayer
from esper.kasmina.growth import WidthGrowth, pair_modules
from esper.kasmina.growth.config import GrowthConfig, units_to_add
from esper.v1 import common_pb2

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _io_dims(model: nn.Module, growth: WidthGrowth, site: str) -> tuple[int, int]:
    """(features each unit reads, features each unit writes) at `site`'s pair."""
    mods = pair_modules(model, growth.pairs[site])
    per_in = mods.producer.weight[0].numel()
    w = mods.consumer.weight
    per_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
    return per_in, per_out


class RunGrowth:
    """Width growth of one run (None-free: built only when the run allows width and the host has pairs)."""

    def __init__(self, model: nn.Module, cfg: GrowthConfig, sites: list[tuple[str, KasminaLayer]],
                 input_shape: tuple[int, ...]) -> None:
        self.cfg = cfg
        self.model = model
        pairs = model.width_pairs()
        self.width = WidthGrowth(model, pairs, sites, input_shape)
        self._unit_costs: dict[tuple[str, int], tuple[int, int]] = {}
        # Set by the trainer: a few training batches for the statistics pass, and the optimizer.
        self.batches: Batches = lambda: []
        self.optimizer: torch.optim.Optimizer | None = None

    @staticmethod
    def enabled_for(model: nn.Module, cfg: GrowthConfig) -> bool:
        return "width" in cfg.modes and hasattr(model, "width_pairs")

    def width_site(self, site: str) -> common_pb2.WidthSite | None:
        """The node's WidthSite (None when the site has no width pair)."""
        if self.width.pair_at(site) is None:
            return None
        units = self.width.width_at(site)
        key = (site, units)
        if key not in self._unit_costs:
            self._unit_costs[key] = self.width.unit_costs(site)
        params, flops = self._unit_costs[key]
        per_in, per_out = _io_dims(self.model, self.width, site)
        return common_pb2.WidthSite(units=units, input_dim=per_in, output_dim=per_out, unit_parameters=params,
                                    unit_flops=flops, available=not self.width.blocked(site))

    def germinate(self, decision: common_pb2.AdaptationDecision) -> int:
        """Plants the width seed a decision asks for; returns its statistics pass's cost in forward passes."""
        site = decision.layer_name
        units = int(decision.growth_units) or units_to_add(self.cfg, self.width.width_at(site))
        step = self.width.unit_step(site)
        units = max(step, units - units % step)
        init = decision.growth_init or self.cfg.init
        batches = self.batches
        limit = self.cfg.statistics_batches

        def few() -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for batch in batches():
                out.append(batch)
                if len(out) >= limit:
                    break
            return out

        return self.width.germinate(site, decision.seed_index, units, init, few, F.cross_entropy,
                                    optimizer=self.optimizer, fill=self.cfg.optimizer_fill, reason=decision.reason)

    def merge_fossilized(self) -> list[tuple[str, int, int]]:
        """Merges fossilized width seeds (the optimizer's host group takes the merged parameters)."""
        return self.width.merge_fossilized(self.optimizer, self.cfg.optimizer_fill)

    def state_dict(self) -> dict[str, Any]:
        return {"merged": [list(m) for m in self.width.merged]}

    def restore_structure(self, state: dict[str, Any] | None) -> None:
        """Re-applies a checkpoint's merges to the freshly built host, before its weights load."""
        if state:
            self.width.restore([tuple(m) for m in state.get("merged", [])])
