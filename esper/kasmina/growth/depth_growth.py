"""Depth seeds in the seed lifecycle: a new block on trial after a site, merged into its DepthStack.

A depth seed holds one new block (an identity Linear for an MLP hidden layer, an identity or
neighbour-copy residual block for a ResNet block) and occupies a slot of the site it follows. Its
output is the *change* the block makes to the host's `DepthStack` output z: `s = act(block(z)) - z`,
blended by the slot's state and alpha like any seed (`z + alpha * s`; straight-through in
TRAINING), so insertion is exact and a cull just drops it. At FOSSILIZED the block (the very same
parameters, with their optimizer state) is appended to the stack and joins the optimizer's host
group; the slot is freed. `merged` records each merge so a checkpoint can rebuild the stacks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from esper.kasmina.blueprints import BlueprintSpec
from esper.kasmina.growth.blend import lifecycle_blend, spec_tag
from esper.kasmina.growth.depth import DEPTH_MODES, identity_block, identity_linear
from esper.kasmina.growth.errors import GrowthError
from esper.kasmina.growth.pair import resolve
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.lifecycle import ACTIVE_STATES
from esper.kasmina.model_state import buffers_and_mode_kept
from esper.lifecycle import SeedLifecycleState as S

FAMILY = "depth"


class DepthSeed(nn.Module):
    """One new block on trial: `forward(z) = act(block(z)) - z` (0 at insertion)."""

    blends_elsewhere = True
    blueprint_id = "depth"

    def __init__(self, block: nn.Module, relu_after: bool) -> None:
        super().__init__()
        self.block = block
        self.relu_after = relu_after

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.block(z)
        return (torch.relu(y) if self.relu_after else y) - z


def depth_spec(stack: str, mode: str) -> BlueprintSpec:
    """The slot's blueprint record of a depth seed (rebuilds it from a checkpoint)."""
    return BlueprintSpec(blueprint_id=FAMILY, family=FAMILY, version=1, description=f"a new block in {stack}",
                         tags=[f"stack={stack}", f"mode={mode}"])


class DepthGrowth:
    """The depth sites of a wrapped model (host `depth_sites()`), tied to their Kasmina sites."""

    def __init__(self, model: nn.Module, depth_sites: Iterable[tuple[str, str]],
                 sites: list[tuple[str, KasminaLayer]]) -> None:
        self.model = model
        self.sites = dict(sites)
        self.stacks = {site: stack for site, stack in depth_sites if site in self.sites}
        self.merged: list[tuple[str, str]] = []
        self._live: dict[tuple[str, int], tuple[DepthSeed, object]] = {}
        for site in self.stacks:
            self.sites[site].seed_builders[FAMILY] = functools.partial(self._build, site)

    def stack(self, site: str) -> nn.Module:
        return resolve(self.model, self.stacks[site])[2]

    def depth_of(self, site: str) -> int:
        """Blocks already merged after `site`."""
        return len(self.stack(site).blocks)

    def in_flight(self, site: str) -> bool:
        return any(key[0] == site for key in self._live)

    def blocked(self, site: str) -> str:
        """Why `site` cannot grow in depth now ("" when it can)."""
        if site not in self.stacks:
            return "no depth site here"
        layer = self.sites[site]
        if any(layer.state_of(i) in ACTIVE_STATES or layer.state_of(i) == S.GERMINATED for i in range(layer.num_seeds)):
            return "a seed of this site is in flight or fossilized"
        return ""

    def _new_block(self, site: str, mode: str) -> tuple[nn.Module, bool]:
        stack = self.stack(site)
        host = self.sites[site].host
        if stack.relu_after:
            if mode != "identity":
                raise ValueError(f"depth growth at {site}: MLP layers grow as 'identity' only, got {mode!r}")
            return identity_linear(host), True
        return identity_block(host, mode), False

    def unit_cost(self, site: str, input_shape: tuple[int, ...]) -> tuple[int, int]:
        """(parameters, forward FLOPs per sample) of one new block at `site`."""
        from torch.utils.flop_counter import FlopCounterMode

        block, relu = self._new_block(site, "identity")
        probe = DepthSeed(block, relu).eval()
        seen: list[torch.Tensor] = []
        stack = self.stack(site)
        handle = stack.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        first = next(self.model.parameters())
        try:
            with buffers_and_mode_kept(self.model), torch.no_grad():
                self.model.eval()
                self.model(torch.zeros((1, *input_shape), device=first.device, dtype=first.dtype))
        finally:
            handle.remove()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            probe(seen[0])
        return sum(p.numel() for p in block.parameters()), int(counter.get_total_flops())

    def _attach(self, site: str, index: int, seed: DepthSeed) -> None:
        layer = self.sites[site]
        blend = lifecycle_blend(layer, index)

        def hook(module, args, out):
            seed.train(module.training)
            return blend(out, out, seed)
        handle = self.stack(site).register_forward_hook(hook)
        layer.structure_changed()  # the seed now runs after the stack
        key = (site, index)
        self._live[key] = (seed, handle)

        def release() -> None:
            handle.remove()
            self._live.pop(key, None)
        seed.release = release

    def _build(self, site: str, spec: BlueprintSpec, index: int) -> DepthSeed:
        block, relu = self._new_block(site, "identity")  # the checkpoint's weights overwrite it
        seed = DepthSeed(block, relu)
        self._attach(site, index, seed)
        return seed

    def germinate(self, site: str, index: int, mode: str = "identity", reason: str = "") -> None:
        """Plants a depth seed (a block that is the identity) in slot `index` of `site` (-> TRAINING)."""
        if mode not in DEPTH_MODES:
            raise ValueError(f"depth mode {mode!r}; expected one of {DEPTH_MODES}")
        why = self.blocked(site)
        if why:
            raise GrowthError(f"cannot grow depth at {site}: {why}")
        block, relu = self._new_block(site, mode)
        seed = DepthSeed(block, relu)
        self.sites[site].germinate(index, depth_spec(self.stacks[site], mode), module=seed, reason=reason)
        self._attach(site, index, seed)

    def merge_fossilized(self, optimizer: torch.optim.Optimizer | None = None) -> list[tuple[str, int]]:
        """Appends every FOSSILIZED depth seed's block to its stack; returns (site, slot) merged."""
        done = []
        for (site, index), (seed, _) in list(self._live.items()):
            layer = self.sites[site]
            if layer.state_of(index) != S.FOSSILIZED:
                continue
            block = seed.block
            self.stack(site).blocks.append(block)
            spec = layer.blueprint_of(index)
            self.merged.append((self.stacks[site], spec_tag(spec, "mode") if spec is not None else "identity"))
            layer.release_merged(index, f"merged into the host: {self.stacks[site]} now has "
                                        f"{len(self.stack(site).blocks)} block(s)")
            if optimizer is not None:  # after the release: the block is then only the stack's
                adopt_into_host_group(optimizer, self.model, list(block.parameters()))
            done.append((site, index))
        return done

    def restore(self, merged: list) -> None:
        """Re-appends a checkpoint's merged blocks to a freshly built host (weights load afterwards)."""
        by_stack = {stack: site for site, stack in self.stacks.items()}
        for stack, mode in merged:
            if stack not in by_stack:
                raise ValueError(f"checkpoint grew depth at {stack!r}, which this model does not have; "
                                 f"expected one of {sorted(by_stack)}")
            block, _ = self._new_block(by_stack[stack], "identity")
            self.stack(by_stack[stack]).blocks.append(block)
            self.merged.append((stack, mode))


def adopt_into_host_group(optimizer: torch.optim.Optimizer, model: nn.Module, params: list[nn.Parameter]) -> None:
    """Moves `params` (with their state) from their seed group into the first (host) group, which is
    kept in `model.parameters()` order so a fresh model's optimizer lines up with a checkpoint."""
    moving = {id(p) for p in params}
    for group in optimizer.param_groups[1:]:
        group["params"] = [p for p in group["params"] if id(p) not in moving]
    host = optimizer.param_groups[0]
    members = {id(p) for p in host["params"]} | moving
    host["params"] = [p for p in model.parameters() if id(p) in members]
