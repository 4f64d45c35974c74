"""`esper-bench growth --protocol pareto`: test accuracy against total training compute.

Arms, all paired by seed index (same split, batch order and initialisation):
  static-w{W}-b{B}   a static host of width W trained for B x the shipped schedule (B in 0.25, 0.5,
                     1, 2 by default), each budget with its own full learning-rate schedule
  esper-b{B}         the host grown by Esper at the same budgets
  static of Esper's final size   the width whose parameter count is closest to Esper's mean final
                     count at 1x (a static arm at 1x, added if it is not in the width list)
  matched-w{W}       that width stopped at each seed's Esper 1x compute (target@matched)
Every arm gets the same learning-rate grid, its rate chosen on validation (pareto_plan).

Each run writes `<workdir>/runs/<arm>/lr<lr>_s<seed>.json`; a rerun with the same `--workdir`
skips what exists, so the protocol can be stopped and resumed, and `--only static` runs the static
arms alone (e.g. while the grower is still changing). Runs go to `--jobs` worker processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from esper.bench.pareto_plan import ESPER, MATCHED, STATIC, Job, ParetoPlan, arm_id
from esper.bench.pareto_stats import (
    arm_summary,
    flops_to_reach,
    frontier_arm,
    paired_against,
    wall_per_flop_ratio,
)
from esper.tolaria.checkpoint import pid_alive

RESULT_KEYS = ("test_acc", "test_loss", "final_val_acc", "best_val_acc", "params_final", "flops", "wall_s",
               "adaptations", "seeds", "epochs", "global_step", "dataset")
PROTOCOL_DEFAULT_BUDGETS = (0.25, 0.5, 1.0, 2.0)


class ProtocolError(ValueError):
    """The protocol's arguments are inconsistent, or a workdir holds another protocol's runs."""


def budget_overrides(budget: float, epochs: int, warmup_epochs: float, steps_per_epoch: int) -> list[str]:
    """Config overrides that train for `budget` x the shipped schedule with its own full schedule:
    `budget * epochs` epochs (as steps when fractional), warmup scaled by the same factor."""
    steps = max(1, int(round(budget * epochs * steps_per_epoch)))
    whole = steps % steps_per_epoch == 0
    out = [f"train.epochs={math.ceil(steps / steps_per_epoch)}", f"train.max_steps={0 if whole else steps}",
           f"schedule.warmup_epochs={warmup_epochs * budget:g}"]
    return out


def matched_overrides(steps: int, epochs: int, warmup_epochs: float, steps_per_epoch: int) -> list[str]:
    """Overrides for a run of exactly `steps` optimizer steps, its schedule laid over them."""
    scale = steps / max(1, epochs * steps_per_epoch)
    return [f"train.epochs={math.ceil(steps / steps_per_epoch)}", f"train.max_steps={steps}",
            f"schedule.warmup_epochs={warmup_epochs * scale:g}"]


def job_overrides(job: Job, base: dict[str, Any]) -> list[str]:
    """The overrides of one job on top of the protocol's base config and overrides."""
    out = [f"train.seed={job.seed}", f"optim.lr={job.lr!r}", "logging.tensorboard=false",
           "logging.timeline_plot=false", "checkpoint.keep_last=1", "checkpoint.save_best=false",
           # one checkpoint at the end: the same I/O for every arm, out of the per-epoch wall time
           "checkpoint.every_epochs=1000000", "train.torch_threads=1"]
    if job.width is not None:
        out.append(f"model.width={job.width}")
    if job.kind == MATCHED:
        out += matched_overrides(job.max_steps, base["epochs"], base["warmup_epochs"], base["steps_per_epoch"])
    else:
        out += budget_overrides(job.budget, base["epochs"], base["warmup_epochs"], base["steps_per_epoch"])
    return out


def run_job(job: Job, base: dict[str, Any]) -> dict[str, Any]:
    """Trains one job in a scratch directory and writes its result file; returns the result."""
    import torch

    from esper.tolaria.config import load_config
    from esper.tolaria.trainer import Trainer

    torch.set_num_threads(1)
    esper_only = base.get("esper_overrides", []) if job.kind == ESPER else []
    config = load_config(base["config"], [*base["overrides"], *esper_only, *job_overrides(job, base)])
    scratch = Path(base["workdir"]) / "scratch" / job.key.replace("/", "_")
    if scratch.exists():
        shutil.rmtree(scratch)
    trainer = Trainer(config, scratch, morphogenetic=job.kind == ESPER, progress="none")
    trainer.prepare()
    trainer.start()
    summary = trainer.train()
    result = {k: summary.get(k) for k in RESULT_KEYS}
    result["job"] = asdict(job)
    result["width"] = config.model.width
    path = result_path(Path(base["workdir"]), job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=float))
    tmp.replace(path)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def result_path(workdir: Path, job: Job) -> Path:
    return workdir / "runs" / f"{job.key}.json"


def claim(workdir: Path, job: Job) -> bool:
    """Claims a job for this process (a lock file holding our PID), so that several invocations on
    one workdir share its jobs instead of duplicating them. A lock whose process is gone is taken over."""
    lock = result_path(workdir, job).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner == os.getpid():
                return True
            if owner and pid_alive(owner):
                return False
            lock.unlink(missing_ok=True)  # its process died: take the job over
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def load_results(workdir: Path) -> dict[str, dict[str, Any]]:
    """Every finished run under `workdir/runs`, keyed by Job.key."""
    out = {}
    root = workdir / "runs"
    for path in sorted(root.glob("*/*.json")) if root.is_dir() else []:
        out[f"{path.parent.name}/{path.stem}"] = json.loads(path.read_text())
    return out


class HostGeometry:
    """Parameter counts and per-run costs of static widths on the protocol's dataset."""

    def __init__(self, config) -> None:
        from esper.tolaria.data import load_dataset, num_train_batches
        from esper.tolaria.hosts import model_input_shape

        self.config = config
        ds = load_dataset(config.data, config.train.seed)
        self.input_shape = model_input_shape(config.model, ds.input_shape)
        self.num_classes = ds.num_classes
        self.steps_per_epoch = num_train_batches(len(ds.train), config.data.batch_size)
        self.val_samples = len(ds.val)
        self.dataset_name = ds.name
        self._params: dict[int, int] = {}

    def params(self, width: int) -> int:
        if width not in self._params:
            from esper.tolaria.hosts import build_host, count_parameters

            model = build_host(replace(self.config.model, width=width), self.input_shape, self.num_classes)
            self._params[width] = count_parameters(model)
        return self._params[width]

    def width_for_params(self, params: float) -> int:
        """The width whose static model has the parameter count closest to `params`."""
        best, gap = 1, math.inf
        for width in range(1, 16 * self.config.model.width + 1):
            n = self.params(width)
            if abs(n - params) < gap:
                best, gap = width, abs(n - params)
            if n > params:
                break
        return best

    def costs(self, width: int) -> tuple[float, int, int, int]:
        """(forward FLOPs per sample, batch size, validation samples, steps per epoch) of a width."""
        import torch

        from esper.tolaria.hosts import build_host, forward_flops_per_sample

        model = build_host(replace(self.config.model, width=width), self.input_shape, self.num_classes)
        fwd = forward_flops_per_sample(model, self.input_shape, torch.device("cpu"))
        return fwd, self.config.data.batch_size, self.val_samples, self.steps_per_epoch


def dataset_label(config) -> str:
    """The dataset as results name it: its real name plus any non-default MNIST-1D settings."""
    name = config.data.name
    if name == "mnist1d":
        from esper.tolaria.config import Mnist1dConfig

        changed = {k: v for k, v in asdict(config.data.mnist1d).items() if v != getattr(Mnist1dConfig(), k)}
        if changed:
            name += " (" + ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")"
    return name


def _by_seed(results, plan: ParetoPlan, arm: str) -> tuple[float | None, dict[int, dict[str, Any]]]:
    lr = plan.chosen_lr(results, arm)
    if lr is None:
        return None, {}
    runs = {s: results[Job(arm, "", lr, s).key] for s in plan.seeds if Job(arm, "", lr, s).key in results}
    return lr, runs


def _lr_table(results, plan: ParetoPlan, arm: str) -> dict[str, float]:
    """Mean validation accuracy (points) of each grid rate over the tuning seeds that ran it."""
    out = {}
    for lr in plan.lr_grid:
        accs = [100.0 * results[k]["final_val_acc"] for s in plan.tuning
                for k in (Job(arm, "", lr, s).key,) if k in results]
        if accs:
            out[f"{lr:g}"] = sum(accs) / len(accs)
    return out


def aggregate(results: dict[str, dict[str, Any]], plan: ParetoPlan) -> dict[str, Any]:
    """Arm summaries, the frontier comparison per budget, target@matched, FLOPs-to-reach, wall ratio."""
    arms: dict[str, dict[str, Any]] = {}
    runs_of: dict[str, dict[int, dict[str, Any]]] = {}
    kinds: dict[str, str] = {}
    for job in plan.all_jobs(results):
        kinds.setdefault(job.arm, job.kind)
    for arm, kind in kinds.items():
        lr, runs = _by_seed(results, plan, arm)
        if not runs:
            continue
        summary = arm_summary(runs)
        first = next(iter(runs.values()))["job"]
        summary.update(kind=kind, lr=lr, width=first.get("width"), budget=first.get("budget"),
                       lr_val=_lr_table(results, plan, arm))
        if kind == ESPER:
            summary["final_width"] = plan.width_for_params(summary["params"])
            outcomes: dict[str, int] = {}
            for r in runs.values():
                for a in r.get("adaptations") or []:
                    outcomes[a["outcome"]] = outcomes.get(a["outcome"], 0) + 1
            summary["outcomes"] = outcomes
        arms[arm] = summary
        runs_of[arm] = runs
    static = {a: s for a, s in arms.items() if s["kind"] == STATIC}
    out: dict[str, Any] = {"arms": arms, "frontier": {}, "final_width": plan.final_width(results)}
    for b in plan.budgets:
        esper = arms.get(arm_id(ESPER, budget=b, label=plan.esper_label))
        if esper is None:
            continue
        best = frontier_arm(static, esper["flops"])
        same_budget = max(((s["val_acc"], a) for a, s in static.items() if s["budget"] == b), default=(None, None))[1]
        out["frontier"][f"{b:g}"] = {
            "esper": arm_id(ESPER, budget=b, label=plan.esper_label),
            "frontier_arm": best,
            "vs_frontier": paired_against(esper, static[best]) if best else None,
            "same_budget_arm": same_budget,
            "vs_same_budget": paired_against(esper, static[same_budget]) if same_budget else None,
        }
    width = out["final_width"]
    esper1 = arm_id(ESPER, budget=1.0, label=plan.esper_label)
    target = arm_id(STATIC, width, 1.0) if width is not None else None
    matched = arm_id(MATCHED, width, label=plan.esper_label) if width is not None else None
    if esper1 in arms and target in arms:
        out["target"] = {"arm": target, "vs_esper": paired_against(arms[esper1], arms[target])}
        curve = [(arms[arm_id(ESPER, budget=b, label=plan.esper_label)]["flops"], arms[arm_id(ESPER, budget=b, label=plan.esper_label)]["test_acc"]["mean"])
                 for b in plan.budgets if arm_id(ESPER, budget=b, label=plan.esper_label) in arms]
        reach, how = flops_to_reach(curve, arms[target]["test_acc"]["mean"])
        out["flops_to_reach"] = {
            "reference_arm": target, "reference_acc": arms[target]["test_acc"]["mean"],
            "reference_flops": arms[target]["flops"], "esper_flops": reach, "how": how,
            "ratio": None if reach is None else reach / arms[target]["flops"],
            "max_ratio_tried": max(f for f, _ in curve) / arms[target]["flops"] if curve else None,
        }
        out["wall_per_flop"] = wall_per_flop_ratio(runs_of[esper1], runs_of[target])
    if esper1 in arms and matched in arms:
        out["target_matched"] = {"arm": matched, "vs_esper": paired_against(arms[esper1], arms[matched])}
    if plan.esper_label != "esper":
        out["ablation"] = _ablation(results, plan, arms)
    return out


def _ablation(results, plan: ParetoPlan, arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """An Esper variant (its own label) minus the default `esper` arms at each budget, paired by
    seed, both at the variant's rate (run the variant with the default arm's chosen rate)."""
    out = {}
    for b in plan.budgets:
        variant = arms.get(arm_id(ESPER, budget=b, label=plan.esper_label))
        if variant is None:
            continue
        base_arm = arm_id(ESPER, budget=b)
        runs = {s: results[k] for s in plan.seeds for k in (Job(base_arm, "", variant["lr"], s).key,) if k in results}
        if runs:
            base = arm_summary(runs)
            out[f"{b:g}"] = {"variant": arm_id(ESPER, budget=b, label=plan.esper_label), "base": base_arm,
                             "lr": variant["lr"], "base_test_acc": base["test_acc"],
                             "variant_minus_base": paired_against(variant, base)}
    return out


def check_targets(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    checks = []
    tm = (agg.get("target_matched") or {}).get("vs_esper")
    if tm:
        checks.append({"target": "esper - target@matched >= +1.0 point with p < 0.05",
                       "value": f"{tm['mean']:+.2f} (95% CI {tm['ci_low']:+.2f}..{tm['ci_high']:+.2f}, p={tm['p_value']:.3g})",
                       "met": tm["mean"] >= 1.0 and tm["p_value"] < 0.05})
        checks.append({"target": "non-inferiority: esper - target@matched >= -0.5, 95% CI low end > -1.5",
                       "value": f"{tm['mean']:+.2f} (CI low {tm['ci_low']:+.2f})",
                       "met": tm["mean"] >= -0.5 and tm["ci_low"] > -1.5})
    ftr = agg.get("flops_to_reach")
    if ftr:
        value = ("not reached (up to " f"{ftr['max_ratio_tried']:.2f}x)" if ftr["ratio"] is None
                 else f"{ftr['ratio']:.2f}x ({ftr['how']})")
        checks.append({"target": "esper reaches the full-budget static model of its final size with <= 0.8x its FLOPs",
                       "value": value, "met": ftr["ratio"] is not None and ftr["ratio"] <= 0.8})
    worst = [(b, f["vs_frontier"]["mean"]) for b, f in agg["frontier"].items() if f["vs_frontier"]]
    if worst:
        b, m = min(worst, key=lambda t: t[1])
        checks.append({"target": "never below the static frontier by more than 0.5 points at any budget",
                       "value": f"worst {m:+.2f} at budget {b}x", "met": m >= -0.5})
    wall = agg.get("wall_per_flop")
    if wall and wall["n"]:
        checks.append({"target": "esper wall time per FLOP <= 1.25x the static model of its final size",
                       "value": f"{wall['geomean']:.2f}x (range {wall['min']:.2f}..{wall['max']:.2f}, n={wall['n']})",
                       "met": wall["geomean"] <= 1.25})
    return checks


def deviations(plan: ParetoPlan) -> list[str]:
    """How this run departs from the issue's protocol (stated in the results file)."""
    out = []
    if len(plan.seeds) < 20:
        out.append(f"{len(plan.seeds)} paired seeds instead of 20")
    if len(plan.widths) < 3:
        out.append(f"{len(plan.widths)} static widths instead of >= 3")
    missing = [b for b in PROTOCOL_DEFAULT_BUDGETS if b not in plan.budgets]
    if missing:
        out.append(f"budgets {plan.budgets} (missing {missing})")
    if len(plan.lr_grid) > 1 and len(plan.tuning) < len(plan.seeds):
        out.append(f"learning rates chosen on the first {len(plan.tuning)} seed indices' validation accuracy, "
                   f"the other {len(plan.seeds) - len(plan.tuning)} seeds run at the chosen rate only")
    if len(plan.lr_grid) == 1:
        out.append(f"a single learning rate ({plan.lr_grid[0]:g}), no grid")
    return out


def build_plan(args, config, geometry: HostGeometry) -> ParetoPlan:
    widths = args.widths or [config.model.width, int(round(1.5 * config.model.width)), 2 * config.model.width]
    budgets = args.budgets or list(PROTOCOL_DEFAULT_BUDGETS)
    lr_grid = args.lr_grid or [config.optim.lr, config.optim.lr / 2, config.optim.lr * 2]
    if len(set(widths)) != len(widths) or any(w < 1 for w in widths):
        raise ProtocolError(f"--widths: expected distinct positive ints, got {widths}")
    if any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise ProtocolError(f"--budgets: expected distinct positive multipliers, got {budgets}")
    if any(lr <= 0 for lr in lr_grid) or len(set(lr_grid)) != len(lr_grid):
        raise ProtocolError(f"--lr-grid: expected distinct positive rates, got {lr_grid}")
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or 20)))
    kinds = frozenset({STATIC, ESPER, MATCHED}) if "all" in args.only else frozenset(args.only)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", args.esper_label):
        raise ProtocolError(f"--esper-label: expected letters, digits and _, starting with a letter; got {args.esper_label!r}")
    return ParetoPlan(widths=widths, budgets=budgets, lr_grid=lr_grid, seeds=seeds,
                      tune_seeds=args.tune_seeds or len(seeds), width_for_params=geometry.width_for_params,
                      static_costs=geometry.costs, kinds=kinds, esper_label=args.esper_label)


def _check_workdir(workdir: Path, fingerprint: dict[str, Any], name: str = "protocol") -> None:
    """A workdir belongs to one protocol (config, overrides, dataset), and an Esper label to one set
    of Esper overrides; refuse to mix runs."""
    path = workdir / f"{name}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != fingerprint:
            diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            raise ProtocolError(f"--workdir {workdir} holds runs of another protocol (differs in {diff}); "
                                "expected the same --config, --dataset and --override values, or a new --workdir")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=2))


def execute(plan: ParetoPlan, base: dict[str, Any], jobs: int, echo=print) -> dict[str, dict[str, Any]]:
    """Runs every ready job until the plan is complete; returns all results."""
    workdir = Path(base["workdir"])
    results = load_results(workdir)
    tuning = set(plan.tuning)

    def order(job: Job) -> tuple:
        # Tuning runs first (they unlock the rest), then seed by seed, so that a protocol stopped
        # early holds complete seeds across arms rather than complete arms over some seeds.
        return (job.seed not in tuning, job.seed, job.arm)

    if jobs <= 1:
        while True:
            results.update(load_results(workdir))  # what other invocations finished meanwhile
            ready = [j for j in sorted(plan.ready(results), key=order) if claim(workdir, j)]
            if not ready:
                return results
            job = ready[0]
            for other in ready[1:]:
                result_path(workdir, other).with_suffix(".lock").unlink(missing_ok=True)
            results[job.key] = run_job(job, base)
            result_path(workdir, job).with_suffix(".lock").unlink(missing_ok=True)
            echo(_progress(job, results[job.key], results, plan))
    in_flight: dict[Future, Job] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        while True:
            results.update(load_results(workdir))  # what other invocations finished meanwhile
            busy = {j.key for j in in_flight.values()}
            for job in sorted(plan.ready(results), key=order):
                if len(in_flight) >= jobs:
                    break
                if job.key not in busy and claim(workdir, job):
                    in_flight[pool.submit(run_job, job, base)] = job
                    busy.add(job.key)
            if not in_flight:
                return results
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                results[job.key] = future.result()
                result_path(workdir, job).with_suffix(".lock").unlink(missing_ok=True)
                echo(_progress(job, results[job.key], results, plan))


def _progress(job: Job, result: dict[str, Any], results, plan: ParetoPlan) -> str:
    return (f"[{len(results)} runs] {job.key}: test {100 * result['test_acc']:.2f} val "
            f"{100 * result['final_val_acc']:.2f} params {result['params_final']} "
            f"flops {result['flops']['total']:.3e} wall {result['wall_s']:.1f}s")


def run(args) -> int:
    """Runs (or resumes) the protocol and writes the Markdown table, PNG plot and JSON."""
    from esper.bench.pareto_report import plot, to_markdown
    from esper.tolaria.config import load_config

    config_path = args.config
    overrides = [f"data.name={args.dataset}", *args.override]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    config = load_config(config_path, overrides)
    geometry = HostGeometry(config)
    plan = build_plan(args, config, geometry)
    workdir = Path(args.workdir)
    base = {"config": config_path, "overrides": overrides, "workdir": str(workdir), "epochs": config.train.epochs,
            "warmup_epochs": config.schedule.warmup_epochs, "steps_per_epoch": geometry.steps_per_epoch}
    _check_workdir(workdir, {"config": config_path, "overrides": overrides})
    _check_workdir(workdir, {"esper_overrides": list(args.esper_override)}, f"esper_{args.esper_label}")
    base["esper_overrides"] = list(args.esper_override)
    start = time.perf_counter()
    results = load_results(workdir) if args.report_only else execute(plan, base, args.jobs)
    plan = replace(plan, kinds=frozenset({STATIC, ESPER, MATCHED}))  # report every arm that has runs
    agg = aggregate(results, plan)
    report = {
        "dataset": dataset_label(config), "config": config_path, "overrides": overrides,
        "esper_label": plan.esper_label, "esper_overrides": list(args.esper_override),
        "model": config.model.name, "host_width": config.model.width, "widths": plan.widths,
        "budgets": plan.budgets, "lr_grid": plan.lr_grid, "seeds": plan.seeds, "tuning_seeds": plan.tuning,
        "shipped_epochs": config.train.epochs, "only": args.only, "wall_s_this_invocation": time.perf_counter() - start,
        "complete": plan.complete(results), "deviations": deviations(plan), "notes": list(args.note),
        "aggregate": agg, "targets": check_targets(agg), "runs": len(results),
    }
    if args.report_only:
        report["notes"].insert(0, "Written with --report-only from the runs in --workdir; the same command without "
                                  "--report-only trains whatever run the workdir lacks first (all of them in an "
                                  "empty workdir), then writes the same files.")
    argv = list(getattr(args, "argv", sys.argv[2:]))
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    command = "esper-bench growth " + " ".join(shlex.quote(a) for a in shown)
    report["command"] = command + (" (plus the --note lines printed below)" if len(shown) < len(argv) else "")
    text = to_markdown(report)
    print(text)
    stem = Path(args.output) if args.output else None
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=float))
        report["plot"] = plot(report, Path(f"{stem}.png"))
        Path(f"{stem}.md").write_text(to_markdown(report))
    return 0


def add_arguments(p) -> None:
    """The pareto-only arguments of `esper-bench growth` (the shared ones live in growth.py)."""
    g = p.add_argument_group("--protocol pareto")
    g.add_argument("--widths", type=int, nargs="+", help="static widths (default: host, 1.5x, 2x)")
    g.add_argument("--budgets", type=float, nargs="+", help="budgets as multiples of the shipped schedule "
                   "(default: 0.25 0.5 1 2)")
    g.add_argument("--lr-grid", type=float, nargs="+", help="learning rates every arm tries (default: shipped "
                   "rate, half, double; the shipped one wins ties)")
    g.add_argument("--tune-seeds", type=int, default=0, help="seed indices the rate is chosen on (default: all)")
    g.add_argument("--only", choices=("all", STATIC, ESPER, MATCHED), nargs="+", default=["all"],
                   help="run only these kinds of arms now (a later run with the same --workdir adds the rest)")
    g.add_argument("--esper-override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the Esper arms only (e.g. growth.modes=[width]; repeatable)")
    g.add_argument("--esper-label", default="esper", help="name of this Esper variant's arms (an ablation "
                   "next to the same static arms in one --workdir)")
    g.add_argument("--report-only", action="store_true", help="train nothing: report the runs the workdir holds")
    g.add_argument("--output", help="write <OUTPUT>.md, <OUTPUT>.png and <OUTPUT>.json")
    g.add_argument("--note", action="append", default=[], help="a line for the results file (repeatable)")
