"""`GrowthConfig`: how a run grows. One definition: Tolaria's ``growth`` config section and the
growth knobs of Tamiyo's policy settings (`esper.tamiyo.settings.PolicySettings.growth`) are
this type, so its defaults are defined here only."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from esper.kasmina.growth.depth import DEPTH_MODES, DepthInit
from esper.kasmina.growth.init import INITS, GrowthInit
from esper.kasmina.growth.optim_state import FILLS, OptimizerFill

GrowthMode = Literal["branch", "width", "depth"]
MODES: tuple[str, ...] = get_args(GrowthMode)
"""Growth modes a run may allow."""
WidthLifecycle = Literal["full", "direct"]
WIDTH_LIFECYCLES: tuple[str, ...] = get_args(WidthLifecycle)


@dataclass
class GrowthConfig:
    """Growth modes the controller may choose and how width seeds are made."""

    # Allowed modes: "branch" (residual blueprints), "width" (new units merged when fossilized),
    # "depth" (a new block after a site, identity at insertion, merged when fossilized).
    modes: list[GrowthMode] = field(default_factory=lambda: ["branch"])
    # Units one width seed adds: width_units if > 0, else round(width_factor * current units).
    width_units: int = 0
    width_factor: float = 1.0
    # Initialisation of width seeds: gradmax, tiny or random.
    init: GrowthInit = "gradmax"
    # full: a width seed goes through the seed lifecycle (trial, counterfactual, cull or merge);
    # direct: GradMax/TINY-style growth, the units are merged into the host at once (insertion is
    # function-preserving for gradmax and random; TINY takes its line-searched step), no trial.
    # direct is the default: in paired runs (20 seeds, teacher-student 2x6 host nobody tuned for;
    # 10 seeds, MNIST-1D 2x16 MLP) it beat the full lifecycle by 1.3 and 2.5 points at equal
    # compute (benchmarks/results/growth_pareto_*direct*.md): a trial costs steps on units that
    # are function-preserving anyway, and the counterfactual culled seeds that would have paid.
    width_lifecycle: WidthLifecycle = "direct"
    # Optimizer state of new entries: zero (zero-padded) or stats (second moments from the host's).
    optimizer_fill: OptimizerFill = "zero"
    # Depth seeds of ResNet hosts: "identity" (fresh block, last norm zero) or "copy" (the
    # neighbour's weights, last norm zero); MLP layers are always identity-initialised.
    depth_init: DepthInit = "identity"
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


def growth_config_from_mapping(values: Mapping[str, Any], prefix: str = "growth.") -> GrowthConfig:
    """A `GrowthConfig` from a mapping of its fields (a policy config's ``growth``); ValueError
    naming `prefix` + the key of an unknown key or a wrongly typed or out-of-range value."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.')}: expected a mapping of growth settings, got {type(values).__name__}")
    cfg = GrowthConfig()
    hints = typing.get_type_hints(GrowthConfig)
    names = [f.name for f in dataclasses.fields(GrowthConfig)]
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{prefix}{key}: unknown key; expected some of {names}")
        setattr(cfg, key, _checked(f"{prefix}{key}", value, hints[key]))
    check_growth_config(cfg, prefix)
    return cfg


def _checked(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_checked(key, v, inner) for v in value]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: unknown value {value!r}; expected one of {', '.join(typing.get_args(tp))}")
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def units_to_add(cfg: GrowthConfig, current: int) -> int:
    """How many units one width seed adds to a pair that has `current` units."""
    return cfg.width_units if cfg.width_units > 0 else max(1, round(cfg.width_factor * current))
