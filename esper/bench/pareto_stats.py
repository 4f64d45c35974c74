"""Statistics of the Pareto growth protocol: per-arm summaries, the static frontier, paired tests.

Inputs are the per-run result dicts (`final_val_acc`, `test_acc`, `params_final`, `wall_s`,
`flops.total`), keyed by `Job.key`. Accuracies are reported in points (percent).

- arm summary: mean, sd and 95% confidence interval of test accuracy over seeds, mean FLOPs.
- static frontier at a compute C: among static arms whose mean total FLOPs is at most C, the one
  with the best mean *validation* accuracy (choosing it on test would flatter the baseline with
  selection noise; choosing on validation is the same rule each arm's learning rate follows).
- paired difference (esper - other) per seed: mean, sd, 95% CI, wins, two-sided paired t-test.
- FLOPs to reach: the compute at which Esper's accuracy-vs-FLOPs curve (mean over seeds, linear
  in log FLOPs between budgets) first reaches a reference accuracy, as a ratio to a reference cost.
"""

from __future__ import annotations

import math
import statistics
from typing import Any


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sd, n and the two-sided t confidence interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    if n < 2:
        return {"mean": mean, "sd": float("nan"), "n": n, "ci_low": float("nan"), "ci_high": float("nan")}
    from scipy import stats

    sd = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired difference a - b: mean, sd, 95% CI, wins/ties, two-sided paired t-test p-value."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    out = mean_ci(diffs)
    out["wins"] = sum(d > 0 for d in diffs)
    out["ties"] = sum(d == 0 for d in diffs)
    p = float("nan")
    if len(diffs) > 1:
        from scipy import stats

        if all(d == diffs[0] for d in diffs):  # no spread: the t statistic is undefined
            p = 1.0 if diffs[0] == 0 else 0.0
        else:
            p = float(stats.ttest_rel(a, b).pvalue)
    out["p_value"] = p
    return out


def arm_summary(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Summary of one arm from {seed: result} at its chosen learning rate."""
    seeds = sorted(runs)
    test = [100.0 * runs[s]["test_acc"] for s in seeds]
    val = [100.0 * runs[s]["final_val_acc"] for s in seeds]
    flops = [float(runs[s]["flops"]["total"]) for s in seeds]
    return {
        "seeds": seeds,
        "test_acc": mean_ci(test),
        "val_acc": statistics.fmean(val),
        "flops": statistics.fmean(flops),
        "flops_sd": statistics.stdev(flops) if len(flops) > 1 else 0.0,
        "params": statistics.fmean(float(runs[s]["params_final"]) for s in seeds),
        "wall_s": statistics.fmean(float(runs[s]["wall_s"]) for s in seeds),
        "test_acc_per_seed": dict(zip(seeds, test, strict=True)),
    }


def frontier_arm(static: dict[str, dict[str, Any]], compute: float, tolerance: float = 1e-9) -> str | None:
    """The static arm with the best mean validation accuracy among those costing <= `compute`."""
    affordable = [(s["val_acc"], -s["flops"], name) for name, s in static.items()
                  if s["flops"] <= compute * (1.0 + tolerance)]
    return max(affordable)[2] if affordable else None


def paired_against(esper: dict[str, Any], other: dict[str, Any]) -> dict[str, float] | None:
    """Paired test over the seeds both arms ran; None when they share fewer than two."""
    common = sorted(set(esper["test_acc_per_seed"]) & set(other["test_acc_per_seed"]))
    if len(common) < 2:
        return None
    result = paired([esper["test_acc_per_seed"][s] for s in common], [other["test_acc_per_seed"][s] for s in common])
    result["seeds"] = len(common)
    return result


def flops_to_reach(curve: list[tuple[float, float]], accuracy: float) -> tuple[float | None, str]:
    """FLOPs at which a (flops, accuracy) curve first reaches `accuracy`, and how it was found.

    Points are sorted by compute; between two budgets the accuracy is taken as linear in log
    FLOPs. Returns (flops, "interpolated"), (first point's flops, "at or below the smallest budget")
    when the cheapest point already reaches it, or (None, "not reached") when no point does.
    """
    points = sorted(curve)
    if not points:
        return None, "no points"
    if points[0][1] >= accuracy:
        return points[0][0], "at or below the smallest budget"
    for (f0, a0), (f1, a1) in zip(points, points[1:], strict=False):
        if a1 >= accuracy:
            t = (accuracy - a0) / (a1 - a0) if a1 != a0 else 1.0
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))), "interpolated"
    return None, "not reached"


def wall_per_flop_ratio(esper: dict[int, dict[str, Any]], static: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Esper's wall time per FLOP over the static model's, per common seed: geometric mean and range."""
    ratios = []
    for s in sorted(set(esper) & set(static)):
        e = esper[s]["wall_s"] / esper[s]["flops"]["total"]
        t = static[s]["wall_s"] / static[s]["flops"]["total"]
        if e > 0 and t > 0:
            ratios.append(e / t)
    if not ratios:
        return {"geomean": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    return {"geomean": geo, "min": min(ratios), "max": max(ratios), "n": len(ratios)}
