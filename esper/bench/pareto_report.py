"""The Pareto protocol's report: a Markdown table and a PNG of test accuracy against total FLOPs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _fmt(x: float | None, spec: str = "+.2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _diff_cells(d: dict[str, float] | None) -> str:
    if not d:
        return "n/a | n/a | n/a | n/a"
    return (f"{_fmt(d['mean'])} | {_fmt(d['ci_low'])}..{_fmt(d['ci_high'])} | {d['wins']}/{d['seeds']} | "
            f"{_fmt(d['p_value'], '.3g')}")


def to_markdown(report: dict[str, Any]) -> str:
    """The results file: command, protocol, deviations, arm table, comparisons, targets."""
    agg = report["aggregate"]
    lines = [
        f"# Growth benchmark, compute vs accuracy: {report['dataset']} ({report['model']} host, width "
        f"{report['host_width']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Config `{report['config']}` with overrides `{' '.join(report['overrides'])}`"
        + (f"; Esper arms (`{report['esper_label']}`) also `{' '.join(report['esper_overrides'])}`"
           if report.get("esper_overrides") else "") + ". "
        f"Static arms never grow (seed sites planted, never germinated). "
        f"{len(report['seeds'])} paired seed indices {report['seeds'][0]}..{report['seeds'][-1]}; static widths "
        f"{report['widths']}; budgets {report['budgets']} x the shipped {report['shipped_epochs']} epochs, each with "
        f"its own full schedule; learning-rate grid {report['lr_grid']} for every arm, chosen per arm on the "
        f"mean final validation accuracy of seeds {report['tuning_seeds'] or report['seeds']}. "
        "Accuracy is on the test split (never seen in training or by any choice), in points; compute is total "
        "FLOPs (training 3x forward, per-epoch validation, Esper's counterfactual evaluations). CPU, one thread "
        "per run.",
        "",
    ]
    if not report["complete"]:
        lines += ["**Incomplete: some runs of the protocol have not finished; figures cover the runs present.**", ""]
    if report["deviations"]:
        lines += ["Deviations from the protocol of issue 11: " + "; ".join(report["deviations"]) + ".", ""]
    for note in report["notes"]:
        lines += [note, ""]
    if report.get("plot"):
        lines += [f"![accuracy vs FLOPs]({Path(report['plot']).name})", ""]
    lines += ["## Arms", "",
              "| arm | lr | seeds | test acc (%) | 95% CI | val acc (%) | params | FLOPs | wall (s) | val acc by lr |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in sorted(agg["arms"].items(), key=lambda kv: (kv[1]["kind"], kv[1]["flops"])):
        t = a["test_acc"]
        lrs = ", ".join(f"{k}: {v:.2f}" for k, v in a["lr_val"].items())
        lines.append(f"| {name} | {a['lr']:g} | {t['n']} | {t['mean']:.2f} ± {_fmt(t['sd'], '.2f')} | "
                     f"{_fmt(t['ci_low'], '.2f')}..{_fmt(t['ci_high'], '.2f')} | {a['val_acc']:.2f} | "
                     f"{a['params']:.0f} | {a['flops']:.3e} | {a['wall_s']:.1f} | {lrs} |")
    lines += ["", "## Esper against the static frontier at each budget", "",
              "Frontier = the static arm with the best mean validation accuracy among those whose mean compute "
              "is at most Esper's at that budget. Same budget = the best static width (by validation) trained "
              "for the same multiple of the schedule. Differences are Esper minus the static arm, in points, "
              "paired by seed (two-sided paired t-test).", "",
              "| budget | frontier arm | esper - frontier | 95% CI | wins | p | same-budget arm | esper - it | 95% CI | wins | p |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b, f in agg["frontier"].items():
        lines.append(f"| {b}x | {f['frontier_arm'] or 'none as cheap'} | {_diff_cells(f['vs_frontier'])} | "
                     f"{f['same_budget_arm']} | {_diff_cells(f['vs_same_budget'])} |")
    lines += ["", "## Esper (1x) against the static model of its final size", ""]
    width = agg.get("final_width")
    lines.append(f"Static width of Esper's final size: {width if width is not None else 'n/a'}.")
    lines.append("")
    lines += ["| comparison | esper - other | 95% CI | wins | p |", "|---|---|---|---|---|"]
    for key, label in (("target", "target (full budget)"), ("target_matched", "target@matched (Esper's FLOPs)")):
        if key in agg:
            lines.append(f"| {label}: {agg[key]['arm']} | {_diff_cells(agg[key]['vs_esper'])} |")
    ftr = agg.get("flops_to_reach")
    if ftr:
        ratio = ("not reached within the budgets tried (up to " f"{_fmt(ftr['max_ratio_tried'], '.2f')}x)"
                 if ftr["ratio"] is None else f"{ftr['ratio']:.2f}x ({ftr['how']})")
        lines += ["", f"FLOPs for Esper to reach the accuracy of the full-budget static model of its final size "
                      f"({ftr['reference_arm']}, {ftr['reference_acc']:.2f}%, {ftr['reference_flops']:.3e} FLOPs): "
                      f"**{ratio}** (Esper's mean accuracy per budget, linear in log FLOPs between budgets)."]
    wall = agg.get("wall_per_flop")
    if wall and wall["n"]:
        lines += ["", f"Wall time per FLOP, Esper 1x / static model of its final size 1x, per seed: geometric "
                      f"mean **{wall['geomean']:.2f}x** (range {wall['min']:.2f}..{wall['max']:.2f}, {wall['n']} "
                      "seeds; runs share a loaded machine, so single ratios are noisy)."]
    if agg.get("ablation"):
        lines += ["", f"## Ablation: `{report['esper_label']}` minus the default Esper arms", "",
                  f"Esper overrides of this variant: `{' '.join(report.get('esper_overrides', []))}`; both at "
                  "the same learning rate, paired by seed.", "",
                  "| budget | lr | variant - esper | 95% CI | wins | p |", "|---|---|---|---|---|---|"]
        for b, a in agg["ablation"].items():
            lines.append(f"| {b}x | {a['lr']:g} | {_diff_cells(a['variant_minus_base'])} |")
    lines += ["", "## Targets of issue 11", "", "| target | measured | met |", "|---|---|---|"]
    for c in report["targets"]:
        lines.append(f"| {c['target']} | {c['value']} | {'yes' if c['met'] else '**no**'} |")
    lines += ["", "Esper seed outcomes per budget (all seeds): " + "; ".join(
        f"{name}: {a['outcomes']}" for name, a in sorted(agg["arms"].items()) if "outcomes" in a), ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> str:
    """Test accuracy (mean, 95% CI bars) against mean total FLOPs, one line per static width and
    one for Esper; the static model of Esper's final size and target@matched are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = report["aggregate"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for a in agg["arms"].values():
        t = a["test_acc"]
        err = 0.0 if math.isnan(t["ci_high"]) else t["ci_high"] - t["mean"]
        label = {"static": f"static width {a['width']}", "esper": report.get("esper_label", "esper")}.get(a["kind"])
        if label is None:
            ax.errorbar([a["flops"]], [t["mean"]], yerr=[err], fmt="s", color="black", capsize=3,
                        label=f"target@matched (width {a['width']})")
            continue
        lines.setdefault(label, []).append((a["flops"], t["mean"], err))
    esper = report.get("esper_label", "esper")
    def order(label: str) -> tuple:
        return (label == esper, int(label.rsplit(" ", 1)[1]) if label.startswith("static width ") else 0, label)

    for label, pts in sorted(lines.items(), key=lambda kv: order(kv[0])):
        pts.sort()
        style = {"color": "tab:red", "linewidth": 2.2, "marker": "o"} if label == esper else {"marker": "."}
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, label=label,
                    **style)
    ax.set_xscale("log")
    ax.set_xlabel("total compute (FLOPs: training + validation + counterfactual evaluation)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['dataset']}: {report['model']} host width {report['host_width']}, "
                 f"{len(report['seeds'])} paired seeds (95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
