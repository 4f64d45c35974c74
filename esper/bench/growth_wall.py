"""`esper-bench growth-wall`: wall time per FLOP of an Esper run against the static model of its final size.

Runs, interleaved `--rounds` times in this process (one torch thread): Esper on the config, then
the static host at the width whose parameter count is closest to what that Esper run ended with,
same seed and schedule. Each run is profiled with cProfile; the report gives both runs' wall time,
FLOPs and wall time per FLOP, their ratio (the issue-11 target is <= 1.25x), and the functions of
the `esper` package where the Esper run spends the most cumulative time, next to the same
functions in the static run (so what growth itself costs stands out).

Two more measurements per round, because the profiled wall ratio is biased and noisy: cProfile
adds a cost per Python call, and an Esper run makes about twice the calls of a static one; on a
shared machine other processes stretch wall time unevenly. So each run also reports its process
CPU time, and (unless `--no-unprofiled`) the pair is run once more without the profiler; the
report gives the ratio of wall and of CPU time per FLOP for those runs too.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from esper.bench.cli import standalone_main

QUIET = ["logging.tensorboard=false", "logging.timeline_plot=false", "checkpoint.every_epochs=1000000",
         "checkpoint.keep_last=1", "checkpoint.save_best=false", "services.mode=off", "train.torch_threads=1"]


def _run(config, run_dir: Path, morphogenetic: bool, profiled: bool) -> tuple[dict[str, Any], pstats.Stats | None]:
    """One training run: its summary, with the process CPU time of `train()` as "cpu_s", and its
    profile (None when `profiled` is false; then the summary has "phases", the CPU time per step
    by lifecycle phase, see esper.bench.wall_phases)."""
    from esper.bench.wall_phases import PhaseClock
    from esper.tolaria.trainer import Trainer

    clock = None if profiled else PhaseClock()
    trainer = Trainer(config, run_dir, morphogenetic=morphogenetic, progress="none",
                      hooks=[clock] if clock is not None else ())
    trainer.prepare()
    trainer.start()
    profile = cProfile.Profile() if profiled else None
    cpu = time.process_time()
    if profile is not None:
        profile.enable()
    summary = trainer.train()
    if profile is not None:
        profile.disable()
    summary["cpu_s"] = time.process_time() - cpu
    if clock is not None:
        summary["phases"] = clock.summary(summary["cpu_s"])
    return summary, pstats.Stats(profile) if profile is not None else None


def _per_flop_ratio(esper: dict[str, Any], static: dict[str, Any], key: str) -> float:
    return (esper[key] / esper["flops"]["total"]) / (static[key] / static["flops"]["total"])


def _esper_functions(stats: pstats.Stats) -> dict[str, tuple[int, float]]:
    """{"file:line(function)": (calls, cumulative seconds)} for functions of the esper package."""
    out = {}
    for (path, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        if "/esper/" in path and "/site-packages/" not in path:
            short = path[path.rindex("/esper/") + 1:]
            out[f"{short}:{line}({name})"] = (calls, cumulative)
    return out


def run(args: argparse.Namespace) -> int:
    """Runs the rounds and writes the Markdown report (and JSON)."""
    import torch

    from esper.bench.pareto import HostGeometry
    from esper.tolaria.config import load_config

    torch.set_num_threads(1)
    esper_cfg = load_config(args.config, [*QUIET, f"train.seed={args.seed}", *args.override, *args.esper_override])
    static_base = load_config(args.config, [*QUIET, f"train.seed={args.seed}", *args.override])
    geometry = HostGeometry(static_base)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="esper-growth-wall-"))
    rounds = []
    esper_fns: list[dict[str, tuple[int, float]]] = []
    static_fns: list[dict[str, tuple[int, float]]] = []
    for r in range(args.rounds):
        esper, e_stats = _run(esper_cfg, workdir / f"esper{r}", True, profiled=True)
        width = geometry.width_for_params(esper["params_final"])
        static_cfg = replace(static_base, model=replace(static_base.model, width=width))
        static, s_stats = _run(static_cfg, workdir / f"static{r}", False, profiled=True)
        row = {"width": width, "esper_wall_s": esper["wall_s"], "esper_flops": esper["flops"]["total"],
               "esper_params": esper["params_final"], "esper_test_acc": esper["test_acc"],
               "static_wall_s": static["wall_s"], "static_flops": static["flops"]["total"],
               "static_params": static["params_final"], "static_test_acc": static["test_acc"],
               "ratio": _per_flop_ratio(esper, static, "wall_s"),
               "esper_cpu_s": esper["cpu_s"], "static_cpu_s": static["cpu_s"],
               "cpu_ratio": _per_flop_ratio(esper, static, "cpu_s")}
        if args.unprofiled:
            esper_u, _ = _run(esper_cfg, workdir / f"esper{r}u", True, profiled=False)
            static_u, _ = _run(static_cfg, workdir / f"static{r}u", False, profiled=False)
            row |= {"unprofiled_esper_wall_s": esper_u["wall_s"], "unprofiled_static_wall_s": static_u["wall_s"],
                    "unprofiled_esper_cpu_s": esper_u["cpu_s"], "unprofiled_static_cpu_s": static_u["cpu_s"],
                    "unprofiled_ratio": _per_flop_ratio(esper_u, static_u, "wall_s"),
                    "unprofiled_cpu_ratio": _per_flop_ratio(esper_u, static_u, "cpu_s"),
                    "esper_phases": esper_u["phases"], "static_phases": static_u["phases"]}
        rounds.append(row)
        esper_fns.append(_esper_functions(e_stats))
        static_fns.append(_esper_functions(s_stats))
        extra = (f"; unprofiled {row['unprofiled_ratio']:.2f}x (CPU {row['unprofiled_cpu_ratio']:.2f}x)"
                 if args.unprofiled else "")
        print(f"round {r}: esper {esper['wall_s']:.1f}s {esper['flops']['total']:.3e} FLOPs, static width {width} "
              f"{static['wall_s']:.1f}s {static['flops']['total']:.3e} FLOPs: ratio {row['ratio']:.2f}x "
              f"(CPU {row['cpu_ratio']:.2f}x){extra}", flush=True)
    top = sorted(esper_fns[-1].items(), key=lambda kv: -kv[1][1])[: args.top]
    report = {"config": args.config, "seed": args.seed, "overrides": args.override,
              "esper_overrides": args.esper_override, "rounds": rounds,
              "ratio_median": statistics.median(r["ratio"] for r in rounds),
              "cpu_ratio_median": statistics.median(r["cpu_ratio"] for r in rounds),
              **({"unprofiled_ratio_median": statistics.median(r["unprofiled_ratio"] for r in rounds),
                  "unprofiled_cpu_ratio_median": statistics.median(r["unprofiled_cpu_ratio"] for r in rounds)}
                 if args.unprofiled else {}),
              "top": [{"function": f, "esper_calls": c, "esper_cum_s": t,
                       "static_cum_s": static_fns[-1].get(f, (0, 0.0))[1]} for f, (c, t) in top]}
    command = "esper-bench growth-wall " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[2:]))
    lines = [f"# Wall time per FLOP: Esper against the static model of its final size ({args.config})", "",
             f"Command: `{command}`", "",
             "One torch thread, runs interleaved in one process (Esper, then the static width closest to its final "
             "parameter count, same seed and schedule), each under cProfile (which adds the same per-call cost to "
             "both; Esper makes more calls, so this ratio is biased against it). CPU time is the process's "
             "CPU seconds in `train()`, less stretched than wall time by other processes on a shared machine.",
             "",
             "| round | static width | esper wall (s) | esper FLOPs | static wall (s) | static FLOPs | esper acc | "
             "static acc | wall/FLOP ratio | CPU/FLOP ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds):
        lines.append(f"| {i} | {r['width']} | {r['esper_wall_s']:.1f} | {r['esper_flops']:.3e} | {r['static_wall_s']:.1f} "
                     f"| {r['static_flops']:.3e} | {100 * r['esper_test_acc']:.1f} | {100 * r['static_test_acc']:.1f} "
                     f"| {r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x |")
    lines += ["", f"Median ratio: **{report['ratio_median']:.2f}x** (target <= 1.25x); CPU time per FLOP: "
              f"{report['cpu_ratio_median']:.2f}x.", ""]
    if args.unprofiled:
        lines += ["The same pair again without the profiler:", "",
                  "| round | esper wall (s) | static wall (s) | esper CPU (s) | static CPU (s) | wall/FLOP ratio | "
                  "CPU/FLOP ratio |", "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(rounds):
            lines.append(f"| {i} | {r['unprofiled_esper_wall_s']:.1f} | {r['unprofiled_static_wall_s']:.1f} | "
                         f"{r['unprofiled_esper_cpu_s']:.1f} | {r['unprofiled_static_cpu_s']:.1f} | "
                         f"{r['unprofiled_ratio']:.2f}x | {r['unprofiled_cpu_ratio']:.2f}x |")
        lines += ["", f"Median without the profiler: wall **{report['unprofiled_ratio_median']:.2f}x**, CPU "
                  f"**{report['unprofiled_cpu_ratio_median']:.2f}x**.", ""]
        lines += _phase_lines(rounds[-1])
    lines += [
              "Where the Esper run spends its time (cumulative seconds of `esper` functions, last round; a "
              "function's time includes what it calls):", "",
              "| function | calls | esper cum (s) | static cum (s) |", "|---|---|---|---|"]
    for t in report["top"]:
        lines.append(f"| `{t['function']}` | {t['esper_calls']} | {t['esper_cum_s']:.2f} | {t['static_cum_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    if args.output:  # written before printing: a closed stdout must not lose a long run's report
        Path(f"{args.output}.md").parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.output}.md").write_text(text)
        Path(f"{args.output}.json").write_text(json.dumps(report, indent=2))
    print(text)
    return 0


def _phase_lines(r: dict[str, Any]) -> list[str]:
    """The last unprofiled pair's CPU time per step by lifecycle phase, against the static run's step."""
    static_step = statistics.median(p["median_s"] for p in r["static_phases"]["phases"].values())
    lines = ["CPU time per training step of the last unprofiled Esper run, by the lifecycle states of its "
             "seeds at that step (esper.bench.wall_phases; the first step of each epoch is left out, it carries "
             f"the epoch boundary), against the static run's median step ({1e3 * static_step:.3f} ms):", "",
             "| seeds' states | steps | median step (ms) | x static step | CPU total (s) |", "|---|---|---|---|---|"]
    for name, p in r["esper_phases"]["phases"].items():
        lines.append(f"| {name} | {p['steps']} | {1e3 * p['median_s']:.3f} | {p['median_s'] / static_step:.2f}x | "
                     f"{p['total_s']:.2f} |")
    static_steps = sum(p["total_s"] for p in r["static_phases"]["phases"].values())
    esper_steps = sum(p["total_s"] for p in r["esper_phases"]["phases"].values())
    lines += ["", f"Timed steps: Esper {esper_steps:.2f} s, static {static_steps:.2f} s. The rest of `train()` (epoch "
              f"boundaries: validation, controller, counterfactual, snapshots, statistics passes; the untimed first "
              f"steps; the final test evaluation and checkpoint): Esper {r['esper_phases']['boundary_s']:.2f} s, "
              f"static {r['static_phases']['boundary_s']:.2f} s.", ""]
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `esper-bench growth-wall`."""
    p.add_argument("--config", default="configs/mnist1d.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for both runs")
    p.add_argument("--esper-override", action="append", default=[], metavar="KEY=VALUE", help="for the Esper run")
    p.add_argument("--top", type=int, default=25, help="rows of the profile table")
    p.add_argument("--no-unprofiled", dest="unprofiled", action="store_false",
                   help="skip the second, unprofiled run of each pair")
    p.add_argument("--workdir", help="run directories (default: a temporary directory)")
    p.add_argument("--output", help="write <OUTPUT>.md and <OUTPUT>.json")


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
