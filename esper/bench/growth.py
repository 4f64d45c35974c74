"""`esper-bench growth`: does growing seeds pay? Four arms, paired by seed index.

For each seed index s (same data split and batch order in every arm):
  host            the starting model, static, full schedule
  esper           the same host grown by Esper (heuristic Tamiyo), full schedule
  target          a static model as wide as needed to match the grown model's final parameter
                  count, full schedule
  target@matched  that target stopped at the grown run's total compute (FLOPs of training,
                  validation and every counterfactual evaluation, i.e. growth overhead included),
                  with its learning-rate schedule compressed to that many steps

Reported per arm: mean +- sd of test accuracy, compute and wall time; paired differences
(esper - other) with sd, wins/N and a two-sided paired t-test p-value. Accuracy is on the
dataset's test split, which no arm (and no controller decision) ever looks at during training.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from esper.bench.cli import standalone_main, write_report

DEFAULT_CONFIGS = {"digits": "configs/development.yaml", "mnist1d": "configs/mnist1d.yaml",
                   "teacher_student": "configs/teacher_student_narrow.yaml", "cifar10": "configs/cifar10.yaml",
                   "cifar100": "configs/cifar100.yaml"}
ARMS = ("host", "esper", "target", "target@matched")


def _train(config, run_dir: Path, morphogenetic: bool) -> dict[str, Any]:
    from esper.tolaria.trainer import Trainer

    trainer = Trainer(config, run_dir, morphogenetic=morphogenetic, progress="none")
    trainer.prepare()
    trainer.start()
    summary = trainer.train()
    summary["steps_per_epoch"] = trainer.steps_per_epoch
    summary["batch_size"] = config.data.batch_size
    summary["val_samples"] = len(trainer.data.val)
    return summary


def _width_for(config, params: int, input_shape: tuple[int, ...], num_classes: int) -> int:
    """The host width whose static model has the parameter count closest to `params`."""
    from esper.tolaria.hosts import build_host, count_parameters

    best, best_gap = config.model.width, math.inf
    for width in range(1, 8 * config.model.width + 1):
        n = count_parameters(build_host(replace(config.model, width=width), input_shape, num_classes))
        if abs(n - params) < best_gap:
            best, best_gap = width, abs(n - params)
        if n > params and width > config.model.width:
            break
    return best


def _matched_steps(target: dict[str, Any], budget: float) -> int:
    """Optimizer steps of the target whose training + per-epoch validation FLOPs fit in `budget`."""
    fwd = target["flops"]["forward_per_sample_final"]
    per_step = 3.0 * fwd * target["batch_size"]
    per_epoch_eval = fwd * target["val_samples"]
    spe = target["steps_per_epoch"]
    steps = 0
    while True:
        nxt = steps + 1
        cost = nxt * per_step + math.ceil(nxt / spe) * per_epoch_eval
        if cost > budget:
            return max(1, steps)
        steps = nxt


def run_seed(config_path: str, seed: int, overrides: list[str], workdir: str) -> dict[str, Any]:
    """All four arms for one seed index; returns {arm: summary}."""
    import torch

    from esper.tolaria.config import load_config
    from esper.tolaria.hosts import model_input_shape

    torch.set_num_threads(1)
    base = load_config(config_path, [*overrides, f"train.seed={seed}", "logging.tensorboard=false",
                                     "logging.timeline_plot=false", "checkpoint.keep_last=1",
                                     "checkpoint.save_best=false"])
    root = Path(workdir) / f"seed{seed}"
    out: dict[str, Any] = {}
    out["host"] = _train(base, root / "host", morphogenetic=False)
    out["esper"] = _train(base, root / "esper", morphogenetic=True)
    from esper.tolaria.data import load_dataset

    ds = load_dataset(base.data, seed)
    shape = model_input_shape(base.model, ds.input_shape)
    width = _width_for(base, out["esper"]["params_final"], shape, ds.num_classes)
    wide = replace(base, model=replace(base.model, width=width), morphogenetic=False)
    out["target"] = _train(wide, root / "target", morphogenetic=False)
    budget = out["esper"]["flops"]["total"]
    steps = _matched_steps(out["target"], budget)
    spe = out["target"]["steps_per_epoch"]
    matched = replace(wide, train=replace(wide.train, epochs=math.ceil(steps / spe), max_steps=steps))
    out["target@matched"] = _train(matched, root / "target_matched", morphogenetic=False)
    out["target"]["width"] = out["target@matched"]["width"] = width
    out["target@matched"]["max_steps"] = steps
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, sd


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean and sd of a - b, wins of a, ties, and the two-sided paired t-test p-value."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_sd(diffs)
    p = float("nan")
    if len(diffs) > 1:
        from scipy import stats

        p = 1.0 if all(d == 0 for d in diffs) else float(stats.ttest_rel(a, b).pvalue)
    return {"mean": mean, "sd": sd, "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "n": len(diffs), "p_value": p}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm means and paired differences (accuracy in points, i.e. percent)."""
    arms = {}
    for arm in ARMS:
        acc = [100.0 * r[arm]["test_acc"] for r in per_seed]
        flops = [r[arm]["flops"]["total"] for r in per_seed]
        wall = [r[arm]["wall_s"] for r in per_seed]
        params = [r[arm]["params_final"] for r in per_seed]
        arms[arm] = {"test_acc": mean_sd(acc), "flops": mean_sd(flops), "wall_s": mean_sd(wall),
                     "params": mean_sd(params), "test_acc_per_seed": acc}
    esper = arms["esper"]["test_acc_per_seed"]
    diffs = {f"esper - {arm}": paired(esper, arms[arm]["test_acc_per_seed"]) for arm in ARMS if arm != "esper"}
    outcomes: dict[str, int] = {}
    for r in per_seed:
        for a in r["esper"]["adaptations"]:
            outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
    return {"arms": arms, "paired": diffs, "esper_adaptation_outcomes": outcomes}


def to_markdown(result: dict[str, Any], command: str) -> str:
    agg = result["aggregate"]
    lines = [
        f"# Growth benchmark: {result['dataset']}",
        "",
        f"Command: `{command}`",
        "",
        f"Config: `{result['config']}`, {result['seeds']} paired seeds, device cpu, "
        f"{result['wall_s']:.0f} s in total. Accuracy is on the test split (never seen during training), "
        "in percent; compute is total FLOPs (training, validation and counterfactual evaluations).",
        "",
        "| arm | test acc (%) | params | compute (FLOPs) | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a = agg["arms"][arm]
        lines.append(f"| {arm} | {a['test_acc'][0]:.2f} ± {a['test_acc'][1]:.2f} | {a['params'][0]:.0f} | "
                     f"{a['flops'][0]:.3e} ± {a['flops'][1]:.1e} | {a['wall_s'][0]:.1f} ± {a['wall_s'][1]:.1f} |")
    lines += ["", "| paired difference | mean (points) | sd | wins/N | ties | p (paired t) |", "|---|---|---|---|---|---|"]
    for name, d in agg["paired"].items():
        lines.append(f"| {name} | {d['mean']:+.2f} | {d['sd']:.2f} | {d['wins']}/{d['n']} | {d['ties']} | {d['p_value']:.3g} |")
    lines += ["", f"Esper adaptation outcomes over all seeds: {agg['esper_adaptation_outcomes']}", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs the chosen protocol: `target` (the four arms above) or `pareto` (esper.bench.pareto)."""
    args.config = args.config or DEFAULT_CONFIGS[args.dataset]
    if args.protocol == "pareto":
        from esper.bench import pareto

        if not args.workdir:
            raise SystemExit("esper-bench growth --protocol pareto: --workdir is required "
                             "(it holds one result file per run, so a stopped protocol can resume)")
        from esper.tolaria.config import ConfigError
        from esper.tolaria.data import DataError

        try:
            return pareto.run(args)
        except (pareto.ProtocolError, ConfigError, DataError) as exc:
            print(f"esper-bench growth: {exc}", file=sys.stderr)
            return 2
    if args.seeds is None:
        args.seeds = 10
    return _run_target(args)


def _run_target(args: argparse.Namespace) -> int:
    config = args.config
    overrides = [f"data.name={args.dataset}", *args.override]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    start = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="esper-bench-growth-")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            per_seed = list(pool.map(run_seed, [config] * len(seeds), seeds, [overrides] * len(seeds),
                                     [workdir] * len(seeds)))
    else:
        per_seed = []
        for s in seeds:
            per_seed.append(run_seed(config, s, overrides, workdir))
            print(f"seed {s}: " + ", ".join(f"{arm} {100 * per_seed[-1][arm]['test_acc']:.2f}" for arm in ARMS),
                  flush=True)
    from esper.tolaria.config import load_config

    label = load_config(config, overrides).data.name  # the dataset the runs really used
    result = {
        "dataset": label, "config": config, "overrides": overrides, "seeds": len(seeds),
        "seed_indices": seeds, "wall_s": time.perf_counter() - start, "workdir": workdir,
        "aggregate": aggregate(per_seed),
        "per_seed": [{arm: {k: r[arm][k] for k in ("test_acc", "best_val_acc", "params_final", "flops", "wall_s",
                                                   "adaptations", "seeds", "epochs", "global_step")}
                      for arm in ARMS} for r in per_seed],
    }
    command = "esper-bench growth " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[2:]))
    write_report(to_markdown(result, command), result, args.json, args.markdown)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `esper-bench growth` (the esper-bench CLI discovers this module by them)."""
    p.add_argument("--protocol", choices=("target", "pareto"), default="target",
                   help="target: host/esper/target/target@matched at the shipped schedule; pareto: accuracy "
                   "against compute over widths and budgets (esper.bench.pareto)")
    p.add_argument("--dataset", choices=sorted(DEFAULT_CONFIGS), default="mnist1d")
    p.add_argument("--seeds", type=int, default=None, help="number of paired seeds (default 10; pareto 20)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--config", help="base config (default: configs/development.yaml or configs/mnist1d.yaml)")
    p.add_argument("--epochs", type=int, default=0, help="override train.epochs")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    p.add_argument("--workdir", help="where run directories go (default: a temporary directory)")
    p.add_argument("--json", help="write the full result as JSON")
    p.add_argument("--markdown", help="write the table as Markdown")
    from esper.bench import pareto

    pareto.add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
