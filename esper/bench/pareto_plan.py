"""The jobs of the compute-vs-accuracy (Pareto) growth protocol, and the rules that order them.

An *arm* is one way of training (a static width at a budget, Esper at a budget, the static model
of Esper's final size stopped at Esper's compute). Every arm gets the same learning-rate grid;
its rate is chosen on the validation split over the first `tune_seeds` seed indices (mean final
validation accuracy), and the remaining seeds run at that rate only. A job is one training run
(arm, learning rate, seed); its result is a JSON file named after it, so a protocol that is
stopped and started again reruns nothing it already has.

`ParetoPlan.ready(results)` returns the jobs whose inputs are known and whose result is missing;
the runner calls it after every finished job until it returns nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ESPER = "esper"
STATIC = "static"
MATCHED = "matched"


def arm_id(kind: str, width: int | None = None, budget: float | None = None, label: str = "esper") -> str:
    """Stable name of an arm, used in result file names: static-w8-b0.25, esper-b1, matched-w13.

    `label` names the Esper variant (its own overrides, e.g. an ablation): its arms are
    `<label>-b1` and `matched-<label>-w13`, next to the same static arms."""
    if kind == STATIC:
        return f"static-w{width}-b{budget:g}"
    if kind == ESPER:
        return f"{label}-b{budget:g}"
    if kind == MATCHED:
        return f"matched-w{width}" if label == "esper" else f"matched-{label}-w{width}"
    raise ValueError(f"unknown arm kind {kind!r}; expected static, esper or matched")


@dataclass(frozen=True)
class Job:
    """One training run of the protocol."""

    arm: str
    kind: str
    lr: float
    seed: int
    width: int | None = None
    budget: float | None = None
    # matched only: optimizer steps that spend the paired Esper run's compute.
    max_steps: int = 0

    @property
    def key(self) -> str:
        return f"{self.arm}/lr{self.lr:g}_s{self.seed}"


def choose_lr(results: dict[str, dict[str, Any]], arm: str, grid: list[float], seeds: list[int]) -> float | None:
    """The grid rate with the best mean final validation accuracy of `arm` over `seeds`.

    None while a run is missing. Ties go to the earlier rate in the grid (the grid lists the
    shipped rate first), so a rate is only moved away from when validation says it should be.
    """
    best, best_acc = None, -math.inf
    for lr in grid:
        accs = []
        for s in seeds:
            r = results.get(Job(arm, "", lr, s).key)
            if r is None:
                return None
            accs.append(float(r["final_val_acc"]))
        mean = sum(accs) / len(accs)
        if mean > best_acc + 1e-12:
            best, best_acc = lr, mean
    return best


def matched_steps(budget_flops: float, forward_per_sample: float, batch_size: int, val_samples: int,
                  steps_per_epoch: int) -> int:
    """Optimizer steps whose training (3x forward per sample) + per-epoch validation FLOPs fit in
    `budget_flops` (at least one step)."""
    per_step = 3.0 * forward_per_sample * batch_size
    per_epoch_eval = forward_per_sample * val_samples
    # Closed form for the bulk, then step up/down over the epoch-boundary rounding.
    steps = max(1, int(budget_flops // (per_step + per_epoch_eval / steps_per_epoch)))

    def cost(n: int) -> float:
        return n * per_step + math.ceil(n / steps_per_epoch) * per_epoch_eval

    while cost(steps + 1) <= budget_flops:
        steps += 1
    while steps > 1 and cost(steps) > budget_flops:
        steps -= 1
    return steps


@dataclass
class ParetoPlan:
    """Which runs the protocol needs, given the runs it has."""

    widths: list[int]
    budgets: list[float]
    lr_grid: list[float]
    seeds: list[int]
    tune_seeds: int
    # Returns the static width whose parameter count is closest to `params`.
    width_for_params: Any
    # Returns (forward FLOPs per sample, batch size, validation samples, steps per epoch) of a static width.
    static_costs: Any
    # Which arm kinds to plan: a subset of {static, esper, matched}.
    kinds: frozenset[str] = field(default_factory=lambda: frozenset({STATIC, ESPER, MATCHED}))
    esper_label: str = "esper"

    @property
    def tuning(self) -> list[int]:
        return self.seeds[: max(1, min(self.tune_seeds, len(self.seeds)))] if len(self.lr_grid) > 1 else []

    def final_width(self, results: dict[str, dict[str, Any]]) -> int | None:
        """Static width of Esper's final size: closest parameter count to the mean final parameter
        count of Esper at budget 1x, at its chosen rate, over the tuning seeds (all seeds without a
        grid). Fixed once those runs exist, so later runs never move it."""
        arm = arm_id(ESPER, budget=1.0, label=self.esper_label)
        lr = self.chosen_lr(results, arm)
        if lr is None:
            return None
        keys = [Job(arm, "", lr, s).key for s in (self.tuning or self.seeds)]
        if any(k not in results for k in keys):
            return None
        params = [results[k]["params_final"] for k in keys]
        return int(self.width_for_params(sum(params) / len(params)))

    def chosen_lr(self, results: dict[str, dict[str, Any]], arm: str) -> float | None:
        if len(self.lr_grid) == 1:
            return self.lr_grid[0]
        return choose_lr(results, arm, self.lr_grid, self.tuning)

    def _arm_jobs(self, results, arm: str, make) -> list[Job]:
        """Tuning runs of an arm, then (once its rate is chosen) the remaining seeds at that rate."""
        jobs = [make(lr, s) for lr in self.lr_grid for s in self.tuning]
        lr = self.chosen_lr(results, arm)
        if lr is not None:
            jobs += [make(lr, s) for s in self.seeds if s not in self.tuning]
        return jobs

    def static_arms(self, results: dict[str, dict[str, Any]]) -> list[tuple[int, float]]:
        """(width, budget) of every static arm; the width of Esper's final size joins at budget 1x."""
        arms = [(w, b) for w in self.widths for b in self.budgets]
        final = self.final_width(results) if 1.0 in self.budgets else None
        if final is not None and (final, 1.0) not in arms:
            arms.append((final, 1.0))
        return arms

    def all_jobs(self, results: dict[str, dict[str, Any]]) -> list[Job]:
        """Every job whose inputs are known now (done or not)."""
        jobs: list[Job] = []
        if STATIC in self.kinds:
            for w, b in self.static_arms(results):
                arm = arm_id(STATIC, w, b)
                jobs += self._arm_jobs(results, arm, lambda lr, s, arm=arm, w=w, b=b: Job(arm, STATIC, lr, s, w, b))
        if ESPER in self.kinds:
            for b in self.budgets:
                arm = arm_id(ESPER, budget=b, label=self.esper_label)
                jobs += self._arm_jobs(results, arm, lambda lr, s, arm=arm, b=b: Job(arm, ESPER, lr, s, None, b))
        if MATCHED in self.kinds:
            jobs += self._matched_jobs(results)
        return jobs

    def _matched_jobs(self, results: dict[str, dict[str, Any]]) -> list[Job]:
        """The static model of Esper's final size, stopped at each seed's Esper 1x compute."""
        width = self.final_width(results)
        esper = arm_id(ESPER, budget=1.0, label=self.esper_label)
        esper_lr = self.chosen_lr(results, esper)
        if width is None or esper_lr is None:
            return []
        fwd, batch, val, spe = self.static_costs(width)
        arm = arm_id(MATCHED, width, label=self.esper_label)

        def make(lr: float, s: int) -> Job | None:
            r = results.get(Job(esper, "", esper_lr, s).key)
            if r is None:
                return None
            return Job(arm, MATCHED, lr, s, width, 1.0, matched_steps(r["flops"]["total"], fwd, batch, val, spe))

        return [j for j in self._arm_jobs(results, arm, make) if j is not None]

    def ready(self, results: dict[str, dict[str, Any]]) -> list[Job]:
        """Jobs whose inputs are known and whose result is missing."""
        return [j for j in self.all_jobs(results) if j.key not in results]

    def complete(self, results: dict[str, dict[str, Any]]) -> bool:
        return not self.ready(results)
