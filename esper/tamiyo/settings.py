"""`PolicySettings`: which Tamiyo policy (heuristic, random, gnn) and its knobs and rails, the one
definition shared by the Tamiyo server (``esper-tamiyo --policy-config``), Tolaria's in-process
controller and Tolaria's ``controller`` config section (which is this type: its defaults are
defined here only).

Its growth knobs are Kasmina's `GrowthConfig` (Tolaria's ``growth`` section is this field).
`policy_settings_from_mapping` validates a mapping of them with errors naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from esper.kasmina.growth.config import GrowthConfig, growth_config_from_mapping
from esper.tamiyo.policies import POLICY_KINDS
from esper.tamiyo.policy import HeuristicConfig, RailsConfig
from esper.tamiyo.rails import Controller, SafetyRails

# Fixed choices are Literal types: the type is the one list of allowed values.
PolicyName = Literal["heuristic", "random", "gnn"]


# The policy's and the rails' own defaults, which the settings' flat keys take (defined once there).
_HEURISTIC = HeuristicConfig()
_RAILS = RailsConfig()


@dataclass
class PolicySettings:
    """The Tamiyo policy and the safety rails that apply to every policy (Tolaria's ``controller``)."""

    # heuristic, random (seeded by random_seed) or gnn (a learned policy loaded from policy_path,
    # e.g. esper-train --tamiyo-policy PATH).
    policy: PolicyName = "heuristic"
    policy_path: str = ""
    random_seed: int = 0
    # No germination before this epoch (the host gets a head start).
    start_epoch: int = _HEURISTIC.start_epoch
    # Plateau: relative improvement of val loss over `plateau_window` epochs below the threshold.
    plateau_window: int = _HEURISTIC.plateau_window
    plateau_threshold: float = _HEURISTIC.plateau_threshold
    # Germinate without waiting for a plateau (forces growth, e.g. in tests and demos).
    grow_without_plateau: bool = _HEURISTIC.grow_without_plateau
    cooldown_epochs: int = _RAILS.cooldown_epochs
    max_concurrent: int = _RAILS.max_concurrent
    # Growth budgets relative to the host: extra parameters and extra FLOPs per sample.
    parameter_budget: float = _RAILS.parameter_budget
    compute_budget: float = _RAILS.compute_budget
    max_adaptations: int = _RAILS.max_adaptations
    # Blueprints the policy may choose from (empty = every one fitting the site).
    blueprints: list[str] = field(default_factory=list)
    # Growth modes the policy may choose and the size of a width seed: the run's growth section
    # (Tolaria writes it as `growth.*`; a policy config as a `growth` mapping).
    growth: GrowthConfig = field(default_factory=GrowthConfig)

    def heuristic(self) -> HeuristicConfig:
        return HeuristicConfig(start_epoch=self.start_epoch, plateau_window=self.plateau_window,
                               plateau_threshold=self.plateau_threshold,
                               grow_without_plateau=self.grow_without_plateau, blueprints=tuple(self.blueprints),
                               growth=self.growth)

    def rails(self) -> RailsConfig:
        return RailsConfig(cooldown_epochs=self.cooldown_epochs, max_concurrent=self.max_concurrent,
                           max_adaptations=self.max_adaptations, parameter_budget=self.parameter_budget,
                           compute_budget=self.compute_budget)

    def controller(self, host_flops: float, loaded: Any = None) -> Controller:
        """The configured policy behind the safety rails, for a host of `host_flops` forward FLOPs
        per sample: what Tamiyo runs per run id, and Tolaria in-process (``services.mode: off``).
        `loaded` is an already loaded GNN (`esper.tamiyo.policy_store.LoadedPolicy`), so per-run
        controllers share one copy of the weights; without it a gnn policy is loaded from
        `policy_path` (PolicyLoadError, a ValueError, when it cannot be)."""
        from esper.tamiyo.policies import build_policy

        rails = self.rails()
        return Controller(build_policy(self, rails, host_flops, loaded), SafetyRails(rails, host_flops))


# Flat growth keys of policy configs written before the growth section (policy key -> growth field).
LEGACY_GROWTH_KEYS = {"growth_modes": "modes", "width_units": "width_units", "width_factor": "width_factor"}


def _with_growth_section(values: Mapping[str, Any]) -> dict[str, Any]:
    legacy = {k: v for k, v in values.items() if k in LEGACY_GROWTH_KEYS}
    if not legacy:
        return dict(values)
    out = {k: v for k, v in values.items() if k not in LEGACY_GROWTH_KEYS}
    growth = out.get("growth", {})
    if not isinstance(growth, Mapping):
        raise ValueError(f"policy config: growth expected a mapping, got {type(growth).__name__}")
    clash = [k for k in legacy if LEGACY_GROWTH_KEYS[k] in growth]
    if clash:
        raise ValueError(f"policy config: {clash} and growth.{[LEGACY_GROWTH_KEYS[k] for k in clash]} both set; "
                         "expected the growth section only")
    out["growth"] = {**growth, **{LEGACY_GROWTH_KEYS[k]: v for k, v in legacy.items()}}
    return out


def policy_settings_from_mapping(values: Mapping[str, Any], *, ignore_unknown: tuple[str, ...] = ()
                                 ) -> PolicySettings:
    """A `PolicySettings` from a mapping; ValueError naming an unknown key or a wrongly typed value.

    ``growth`` is a mapping of `GrowthConfig` fields; the flat keys of older policy configs
    (`LEGACY_GROWTH_KEYS`: growth_modes, width_units, width_factor) are read into it.
    """
    settings = PolicySettings()
    types = {f.name: f.type for f in dataclasses.fields(PolicySettings)}
    hints = typing.get_type_hints(PolicySettings)
    values = _with_growth_section(values)
    for key, value in values.items():
        if key in ignore_unknown:
            continue
        if key == "growth":
            settings.growth = growth_config_from_mapping(value, prefix="policy config: growth.")
            continue
        if key not in types:
            raise ValueError(f"policy config: unknown key {key!r}; expected some of {sorted(types)}")
        expected = types[key]
        if typing.get_origin(hints[key]) is Literal:
            choices = typing.get_args(hints[key])
            if value not in choices:
                raise ValueError(f"policy config: {key} expected one of {list(choices)}, got {value!r}")
            setattr(settings, key, value)
            continue
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "str": isinstance(value, str),
        }[expected]
        if not ok:
            raise ValueError(f"policy config: {key} expected {expected}, got {type(value).__name__} {value!r}")
        setattr(settings, key, float(value) if expected == "float" else value)
    if settings.policy not in POLICY_KINDS:
        raise ValueError(f"policy config: policy {settings.policy!r} is unknown; expected one of {list(POLICY_KINDS)}")
    if settings.policy == "gnn" and not settings.policy_path:
        raise ValueError("policy config: policy is gnn but policy_path is empty; expected the directory of a policy "
                         "written by esper-tamiyo-train")
    return settings
