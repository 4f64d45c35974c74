"""`GrowthConfig`: how a run grows (the `growth` section of a Tolaria config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from esper.kasmina.growth.depth import DEPTH_MODES
from esper.kasmina.growth.init import INITS
from esper.kasmina.growth.optim_state import FILLS

MODES = ("branch", "width", "depth")
"""Growth modes a run may allow."""
WIDTH_LIFECYCLES = ("full", "direct")


@dataclass
class GrowthConfig:
    """Growth modes the controller may choose and how width seeds are made."""

    # Allowed modes: "branch" (residual blueprints), "width" (new units merged when fossilized),
    # "depth" (a new block after a site, identity at insertion, merged when fossilized).
    modes: list[str] = field(default_factory=lambda: ["branch"])
    # Units one width seed adds: width_units if > 0, else round(width_factor * current units).
    width_units: int = 0
    width_factor: float = 1.0
    # Initialisation of width seeds: gradmax, tiny or random.
    init: str = "gradmax"
    # full: a width seed goes through the seed lifecycle (trial, counterfactual, cull or merge);
    # direct: GradMax/TINY-style growth, the units are merged into the host at once (insertion is
    # function-preserving for gradmax and random; TINY takes its line-searched step), no trial.
    width_lifecycle: str = "full"
    # Optimizer state of new entries: zero (zero-padded) or stats (second moments from the host's).
    optimizer_fill: str = "zero"
    # Depth seeds of ResNet hosts: "identity" (fresh block, last norm zero) or "copy" (the
    # neighbour's weights, last norm zero); MLP layers are always identity-initialised.
    depth_init: str = "identity"
    # Training batches of the statistics pass that GradMax / TINY use (its FLOPs are growth overhead).
    statistics_batches: int = 4


def check_growth_config(cfg: GrowthConfig, prefix: str = "growth.") -> None:
    """ValueError naming the key of a value outside its allowed set."""
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise ValueError(f"{prefix}modes: {cfg.modes!r}; expected a non-empty list of {', '.join(MODES)}")
    if cfg.init not in INITS:
        raise ValueError(f"{prefix}init: unknown value {cfg.init!r}; expected one of {', '.join(INITS)}")
    if cfg.width_lifecycle not in WIDTH_LIFECYCLES:
        raise ValueError(f"{prefix}width_lifecycle: unknown value {cfg.width_lifecycle!r}; expected one of "
                         f"{', '.join(WIDTH_LIFECYCLES)}")
    if cfg.optimizer_fill not in FILLS:
        raise ValueError(f"{prefix}optimizer_fill: unknown value {cfg.optimizer_fill!r}; expected one of {', '.join(FILLS)}")
    if cfg.depth_init not in DEPTH_MODES:
        raise ValueError(f"{prefix}depth_init: unknown value {cfg.depth_init!r}; expected one of {', '.join(DEPTH_MODES)}")
    if cfg.width_units < 0:
        raise ValueError(f"{prefix}width_units: must be >= 0, got {cfg.width_units}")
    if cfg.width_factor <= 0:
        raise ValueError(f"{prefix}width_factor: must be > 0, got {cfg.width_factor}")
    if cfg.statistics_batches < 1:
        raise ValueError(f"{prefix}statistics_batches: must be >= 1, got {cfg.statistics_batches}")


def units_to_add(cfg: GrowthConfig, current: int) -> int:
    """How many units one width seed adds to a pair that has `current` units."""
    return cfg.width_units if cfg.width_units > 0 else max(1, round(cfg.width_factor * current))
