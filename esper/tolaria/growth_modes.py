"""Growth modes in a Tolaria run: width and depth seeds next to the residual-branch seeds.

`RunGrowth` is what `Morphogenesis` asks about growth beyond residual branches: which sites can
grow in width or depth (the `WidthSite` / `DepthSite` of each graph node), planting a seed when the
controller decides GROWTH_MODE_WIDTH (its GradMax/TINY statistics pass runs on a few training
batches and is counted as growth FLOPs) or GROWTH_MODE_DEPTH, merging fossilized width and depth
seeds into the host at the epoch boundary (the optimizer's host group takes the merged parameters
with their state), and the list of merges a checkpoint needs to rebuild the grown host. Residual
branches are untouched: they stay the "branch" mode, handled by Kasmina's blueprints as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina import KasminaLayer
from esper.kasmina.growth import WidthGrowth, pair_modules
from esper.kasmina.growth.config import GrowthConfig, units_to_add
from esper.kasmina.growth.depth_growth import DepthGrowth
from esper.kasmina.growth.errors import GrowthError
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
    """Width and depth growth of one run (each present when allowed and the host supports it)."""

    def __init__(self, model: nn.Module, cfg: GrowthConfig, sites: list[tuple[str, KasminaLayer]],
                 input_shape: tuple[int, ...], seed: int = 0) -> None:
        self.cfg = cfg
        # Initialisations draw from their own generator (seeded by the run's seed and the slot), so
        # every rank of a distributed run builds the same seed and the run's RNG stream is untouched.
        self.seed = int(seed)
        self.model = model
        self.input_shape = tuple(input_shape)
        self.width: WidthGrowth | None = None
        self.depth: DepthGrowth | None = None
        if "width" in cfg.modes and hasattr(model, "width_pairs"):
            self.width = WidthGrowth(model, model.width_pairs(), sites, input_shape)
        if "depth" in cfg.modes and hasattr(model, "depth_sites"):
            self.depth = DepthGrowth(model, model.depth_sites(), sites)
        self._costs: dict[tuple, tuple[int, int]] = {}
        # Set by the trainer: a few training batches for the statistics pass, and the optimizer.
        self.batches: Batches = lambda: []
        self.optimizer: torch.optim.Optimizer | None = None

    @staticmethod
    def enabled_for(model: nn.Module, cfg: GrowthConfig) -> bool:
        return ("width" in cfg.modes and hasattr(model, "width_pairs")) or (
            "depth" in cfg.modes and hasattr(model, "depth_sites"))

    def merged(self) -> tuple:
        """Every merge so far (changes whenever the host's structure does)."""
        return (tuple(self.width.merged) if self.width else (), tuple(self.depth.merged) if self.depth else ())

    def width_blocked(self, site: str) -> str:
        why = self.width.blocked(site) if self.width is not None else "width growth is not allowed"
        if not why and self.depth is not None and site in self.depth.stacks and self.depth.depth_of(site):
            why = "blocks were added after this layer (their width is fixed)"
        return why

    def width_site(self, site: str) -> common_pb2.WidthSite | None:
        """The node's WidthSite (None when the site has no width pair)."""
        if self.width is None or self.width.pair_at(site) is None:
            return None
        units = self.width.width_at(site)
        key = ("width", site, units)
        if key not in self._costs:
            self._costs[key] = self.width.unit_costs(site)
        params, flops = self._costs[key]
        per_in, per_out = _io_dims(self.model, self.width, site)
        return common_pb2.WidthSite(units=units, input_dim=per_in, output_dim=per_out, unit_parameters=params,
                                    unit_flops=flops, available=not self.width_blocked(site),
                                    initial_units=self.width.first_width(site))

    def depth_site(self, site: str) -> common_pb2.DepthSite | None:
        """The node's DepthSite (None when no block can be added after the site)."""
        if self.depth is None or site not in self.depth.stacks:
            return None
        blocks = self.depth.depth_of(site)
        key = ("depth", site, self.merged())
        if key not in self._costs:
            self._costs[key] = self.depth.unit_cost(site, self.input_shape)
        params, flops = self._costs[key]
        return common_pb2.DepthSite(blocks=blocks, block_parameters=params, block_flops=flops,
                                    available=not self.depth.blocked(site))

    def germinate(self, decision: common_pb2.AdaptationDecision) -> int:
        """Plants the width or depth seed a decision asks for; returns its initialisation's cost in
        single-sample forward passes."""
        site = decision.layer_name
        if decision.growth_mode == common_pb2.GROWTH_MODE_DEPTH:
            if self.depth is None:
                raise GrowthError("depth growth is not allowed in this run (growth.modes) or the host has no depth sites")
            self.depth.germinate(site, decision.seed_index, self.cfg.depth_init, reason=decision.reason)
            return 0
        if self.width is None:
            raise GrowthError("width growth is not allowed in this run (growth.modes) or the host has no width pairs")
        why = self.width_blocked(site)
        if why:
            raise GrowthError(f"cannot grow width at {site}: {why}")
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

        merged = len(self.width.merged)
        # crc32, not hash(): str hashes differ between processes (and so between ranks).
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{site}:{decision.seed_index}:{merged}".encode()))
        if self.direct_width:
            return self.width.grow_now(site, units, init, few, F.cross_entropy, optimizer=self.optimizer,
                                       fill=self.cfg.optimizer_fill, generator=generator)
        return self.width.germinate(site, decision.seed_index, units, init, few, F.cross_entropy,
                                    optimizer=self.optimizer, fill=self.cfg.optimizer_fill, reason=decision.reason,
                                    generator=generator)

    @property
    def direct_width(self) -> bool:
        """Width growth merges at once (growth.width_lifecycle: direct), without a seed lifecycle."""
        return self.cfg.width_lifecycle == "direct"

    def merge_fossilized(self) -> bool:
        """Merges fossilized width and depth seeds into the host; True if the structure changed."""
        merged = False
        if self.width is not None:
            merged |= bool(self.width.merge_fossilized(self.optimizer, self.cfg.optimizer_fill))
        if self.depth is not None:
            merged |= bool(self.depth.merge_fossilized(self.optimizer))
        return merged

    def state_dict(self) -> dict[str, Any]:
        return {"merged": [list(m) for m in self.width.merged] if self.width else [],
                "deepened": [list(m) for m in self.depth.merged] if self.depth else []}

    def restore_structure(self, state: dict[str, Any] | None) -> None:
        """Re-applies a checkpoint's merges to the freshly built host, before its weights load.

        Width first: a layer never widens once blocks follow it, so every depth merge saw the
        final width of its site.
        """
        if not state:
            return
        if state.get("merged"):
            if self.width is None:
                raise ValueError("the checkpoint's model grew in width; expected 'width' in growth.modes")
            self.width.restore([tuple(m) for m in state["merged"]])
        if state.get("deepened"):
            if self.depth is None:
                raise ValueError("the checkpoint's model grew in depth; expected 'depth' in growth.modes")
            self.depth.restore([tuple(m) for m in state["deepened"]])
