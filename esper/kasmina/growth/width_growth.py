"""Width seeds in the seed lifecycle: one Kasmina slot per seed, merged into the host when fossilized.

A width seed occupies a slot of the Kasmina site that holds its pair's producer (an MLP hidden
layer, a CNN conv, a ResNet block). The slot's state and alpha drive it exactly like a residual
seed -- TRAINING: the consumer output is unchanged but the seed learns from the task gradient
(straight-through, with the same alignment gate); GRAFTING: alpha ramps; EVALUATING: the
counterfactual with alpha = 0 -- only its output is added to the pair's consumer. When the slot
reaches FOSSILIZED, `merge_fossilized` merges the units into wider plain host modules (carrying the
seed's optimizer state over) and frees the slot (FOSSILIZED -> DORMANT, "merged"). `merged` lists
every merge, so a checkpoint of the grown model can rebuild the widths before loading.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from esper.kasmina.blueprints import BlueprintSpec
from esper.kasmina.growth.attach import WidthHooks, attached
from esper.kasmina.growth.blend import lifecycle_blend, spec_tag
from esper.kasmina.growth.errors import GrowthError
from esper.kasmina.growth.init import INITS, TINY_SCALES, gradmax_init, random_init, tiny_init
from esper.kasmina.growth.merge import merge_width_seed, regrow, widen_pair
from esper.kasmina.growth.optim_state import fill_new_parameter
from esper.kasmina.growth.pair import WidthPair, pair_modules
from esper.kasmina.growth.seed import WidthSeed
from esper.kasmina.growth.statistics import capture_statistics
from esper.kasmina.layer import KasminaLayer
from esper.kasmina.lifecycle import ACTIVE_STATES
from esper.kasmina.model_state import buffers_and_mode_kept
from esper.lifecycle import SeedLifecycleState as S

FAMILY = "width"
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def width_spec(pair: WidthPair, units: int, init: str) -> BlueprintSpec:
    """The slot's blueprint record of a width seed (rebuilds it from a checkpoint)."""
    return BlueprintSpec(blueprint_id=FAMILY, family=FAMILY, version=1,
                         description=f"{units} new units between {pair.producer} and {pair.consumer}",
                         tags=[f"units={units}", f"pair={pair.key}", f"init={init}"])


class WidthGrowth:
    """The width pairs of a wrapped model, tied to the Kasmina sites that own their seeds."""

    def __init__(self, model: nn.Module, pairs: Iterable[WidthPair], sites: list[tuple[str, KasminaLayer]],
                 input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.sites = sites
        self.pairs: dict[str, WidthPair] = {}   # site name -> pair whose producer it holds
        for pair in pairs:
            site = self._site_of(pair)
            if site is not None and site not in self.pairs:
                pair_modules(model, pair)          # fail early on a wrong description
                self.pairs[site] = pair
        self.merged: list[tuple[str, int]] = []
        self._hooks: dict[tuple[str, int], WidthHooks] = {}
        for name, layer in sites:
            if name in self.pairs:
                layer.seed_builders[FAMILY] = functools.partial(self._build, name, layer)

    def _site_of(self, pair: WidthPair) -> str | None:
        best = None
        for name, _ in self.sites:
            inside = pair.producer == name or pair.producer.startswith(name + ".")
            if inside and (best is None or len(name) > len(best)):
                best = name
        return best

    def _layer(self, site: str) -> KasminaLayer:
        return dict(self.sites)[site]

    def pair_at(self, site: str) -> WidthPair | None:
        return self.pairs.get(site)

    def width_at(self, site: str) -> int:
        """Current units of the pair produced at `site` (0 when the site has no width pair)."""
        pair = self.pairs.get(site)
        return pair_modules(self.model, pair).units if pair is not None else 0

    def first_width(self, site: str) -> int:
        """Units of `site`'s pair before any width seed was merged into it (0 without a pair)."""
        pair = self.pairs.get(site)
        if pair is None:
            return 0
        return self.width_at(site) - sum(units for key, units in self.merged if key == pair.key)

    def blocked(self, site: str) -> str:
        """Why `site` cannot grow in width now ("" when it can)."""
        pair = self.pairs.get(site)
        if pair is None:
            return "no width pair at this site"
        layer = self._layer(site)
        if any(s in ACTIVE_STATES or s == S.GERMINATED for s in (layer.state_of(i) for i in range(layer.num_seeds))):
            return "a seed of this site is in flight or fossilized"
        touched = {pair.producer, pair.consumer}
        for (other, _), hooks in self._hooks.items():
            if touched & {hooks.pair.producer, hooks.pair.consumer}:
                return f"width seed at {other} shares a layer with this pair"
        return ""

    def unit_costs(self, site: str) -> tuple[int, int]:
        """(parameters, forward FLOPs per sample) of one more unit at `site`'s pair."""
        pair = self.pairs[site]
        mods = pair_modules(self.model, pair)
        probe = WidthSeed(pair, mods, 1)
        params = sum(p.numel() for p in probe.parameters())
        return params, _unit_flops(self.model, pair, probe, self.input_shape)

    # ------------------------------------------------------------ lifecycle

    def _build(self, site: str, layer: KasminaLayer, spec: BlueprintSpec, index: int) -> WidthSeed:
        pair = self.pairs[site]
        if spec_tag(spec, "pair") != pair.key:
            raise ValueError(f"width seed at {site} was grown for pair {spec_tag(spec, 'pair')}, expected {pair.key}")
        seed = WidthSeed(pair, pair_modules(self.model, pair), int(spec_tag(spec, "units")))
        self._attach(site, layer, index, seed)
        return seed

    def _attach(self, site: str, layer: KasminaLayer, index: int, seed: WidthSeed) -> None:
        hooks = WidthHooks(self.model, seed.pair, seed, lifecycle_blend(layer, index))
        hooks.install()
        layer.structure_changed()  # the seed now runs inside the pair's consumer
        key = (site, index)
        self._hooks[key] = hooks

        def release() -> None:
            hooks.remove()
            self._hooks.pop(key, None)
        seed.release = release

    def germinate(self, site: str, index: int, units: int, init: str, batches: Batches, loss_fn: LossFn,
                  optimizer: torch.optim.Optimizer | None = None, fill: str = "zero", reason: str = "",
                  generator: torch.Generator | None = None) -> int:
        """Plants an initialised width seed of `units` units in slot `index` of `site` (-> TRAINING).

        The statistics pass (GradMax, TINY) runs on `batches()`; returns its cost in single-sample
        forward passes of the model (a forward+backward counts 3), for FLOP accounting. With
        `optimizer`, the seed parameters' state is prepared per `fill` (they join the optimizer as a
        new group afterwards).
        """
        pair, layer, mods, seed, passes = self._new_seed(site, units, init, batches, loss_fn, generator)
        layer.germinate(index, width_spec(pair, units, init), module=seed, reason=reason)
        self._attach(site, layer, index, seed)
        if optimizer is not None:
            host = {"fan_in.weight": mods.producer.weight, "fan_in.bias": mods.producer.bias,
                    "fan_out.weight": mods.consumer.weight}
            if mods.norm is not None:
                host |= {"norm.weight": mods.norm.weight, "norm.bias": mods.norm.bias}
            for name, p in seed.named_parameters():
                if host.get(name) is not None:
                    fill_new_parameter(optimizer, p, host[name], fill)
        return passes

    def grow_now(self, site: str, units: int, init: str, batches: Batches, loss_fn: LossFn,
                 optimizer: torch.optim.Optimizer | None = None, fill: str = "zero",
                 generator: torch.Generator | None = None) -> int:
        """Direct growth (no lifecycle): initialise `units` units and merge them into the host at once.

        The host's optimizer state is kept and the new entries get zero / `fill` state. Returns the
        statistics pass's cost in single-sample forward passes.
        """
        # Merged at once, the units meet the host's own ReLU (derivative 0 at 0): GradMax zeroes
        # the fan-out instead of the fan-in so that they are live.
        pair, _, _, seed, passes = self._new_seed(site, units, init, batches, loss_fn, generator, zero="fan_out")
        widen_pair(self.model, pair, seed, optimizer, fill)
        self.merged.append((pair.key, units))
        for hooks in self._hooks.values():
            hooks.install()
        return passes

    def _new_seed(self, site: str, units: int, init: str, batches: Batches, loss_fn: LossFn,
                  generator: torch.Generator | None, zero: str = "fan_in"):
        if init not in INITS:
            raise ValueError(f"width init {init!r}; expected one of {INITS}")
        why = self.blocked(site)
        if why:
            raise GrowthError(f"cannot grow width at {site}: {why}")
        pair = self.pairs[site]
        layer = self._layer(site)
        step = self.unit_step(site)
        if units % step:
            raise ValueError(f"width growth at {site}: {units} units; expected a multiple of {step} "
                             f"(the site's {layer.num_seeds} seed slots split its units evenly)")
        mods = pair_modules(self.model, pair)
        seed = WidthSeed(pair, mods, units)
        passes = 0
        if init == "random":
            random_init(seed, mods, generator)
        else:
            data = list(batches())
            stats = capture_statistics(self.model, pair, data, loss_fn)
            passes = 3 * stats.samples  # forward + backward ~ 3 forward passes
            if init == "gradmax":
                gradmax_init(seed, mods, stats, generator, zero=zero)
            else:
                passes += stats.samples * len(TINY_SCALES)  # the line search: forward only
                tiny_init(seed, mods, stats, functools.partial(self._loss_with, pair, data, loss_fn), generator)
        return pair, layer, mods, seed, passes

    def _loss_with(self, pair: WidthPair, data: list, loss_fn: LossFn, seed: WidthSeed) -> float:
        total, count = 0.0, 0
        with buffers_and_mode_kept(self.model), torch.no_grad(), attached(self.model, pair, seed):
            for x, y in data:
                total += float(loss_fn(self.model(x), y)) * x.shape[0]
                count += x.shape[0]
        return total / max(1, count)

    def merge_fossilized(self, optimizer: torch.optim.Optimizer | None = None, fill: str = "zero") -> list[tuple[str, int, int]]:
        """Merges every FOSSILIZED width seed into its host; returns (site, slot, units) merged.

        A merge that would change a site's width while a residual seed of that site is running
        (built for the old width) waits: the width seed keeps working as a seed until then.
        """
        done = []
        for (site, index), hooks in list(self._hooks.items()):
            layer = self._layer(site)
            if layer.state_of(index) != S.FOSSILIZED:
                continue
            seed = hooks.seed
            if self._resizes_site(layer, seed.pair) and any(
                    i != index and layer.state_of(i) in ACTIVE_STATES for i in range(layer.num_seeds)):
                continue  # a residual seed there was built for the current width: stay a seed for now
            merge_width_seed(self.model, seed.pair, seed, optimizer, fill)
            self.merged.append((seed.pair.key, seed.units))
            layer.release_merged(index, f"merged into the host: {seed.pair.key} is now "
                                        f"{pair_modules(self.model, seed.pair).units} units wide")
            done.append((site, index, seed.units))
        for hooks in self._hooks.values():
            hooks.install()  # a merge may have replaced a module another seed hooks into
        return done

    def unit_step(self, site: str) -> int:
        """Units must come in multiples of this at `site` (its slots split the producer's units)."""
        layer = self._layer(site)
        return layer.num_seeds if self._resizes_site(layer, self.pairs[site]) else 1

    def _resizes_site(self, layer: KasminaLayer, pair: WidthPair) -> bool:
        return pair_modules(self.model, pair).producer is layer.host

    def restore(self, merged: list) -> None:
        """Re-applies recorded merges to a freshly built host (zero weights; the checkpoint fills them)."""
        if self.merged:
            raise RuntimeError("WidthGrowth.restore must run on a freshly built host")
        by_key = {p.key: p for p in self.pairs.values()}
        for key, units in merged:
            if key not in by_key:
                raise ValueError(f"checkpoint grew width pair {key!r}, which this model does not have; "
                                 f"expected one of {sorted(by_key)}")
            regrow(self.model, by_key[key], int(units))
            self.merged.append((key, int(units)))


def _unit_flops(model: nn.Module, pair: WidthPair, probe: WidthSeed, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs per sample of one unit, from the input the producer sees on a one-sample probe."""
    from torch.utils.flop_counter import FlopCounterMode

    mods = pair_modules(model, pair)
    seen: list[torch.Tensor] = []
    handle = mods.producer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    first = next(model.parameters())
    try:
        with buffers_and_mode_kept(model), torch.no_grad():
            model.eval()
            model(torch.zeros((1, *input_shape), device=first.device, dtype=first.dtype))
    finally:
        handle.remove()
    counter = FlopCounterMode(display=False)
    probe.eval()
    with torch.no_grad(), counter:
        probe(seen[0])
    return int(counter.get_total_flops())
