"""`esper-bench policy`: the learned Tamiyo policy against the heuristic and random ones, paired by seed.

For each evaluation task and each seed, the same run (same data split, batch order and host) is
trained three times, with ``controller.policy`` = gnn, heuristic and random (the random policy
seeded by the run seed); everything else, the safety rails included, is the task's config, except
``--growth-modes``, which sets ``growth.modes`` for all three alike (default: the task's own).
Evaluate on seeds and tasks the policy never saw: the collection seeds and tasks are recorded
in the policy's manifest (`training.data`), and a task marked ``--heldout-task`` must be absent
from the training data (the benchmark refuses to run otherwise).

Reported per task and policy: test accuracy, total FLOPs (training, validation, counterfactual
evaluations), germinations and fossilization rate (fossilized / germinated); paired differences
(gnn - heuristic, gnn - random, heuristic - random) of accuracy in points and of FLOPs in
percent, with wins/N and two-sided paired t-test p-values. Also the decision latency of the GNN
policy (graph featurisation, forward pass and reason, rails excluded) on a 64-node graph:
p50 and p99 over `--latency-decisions` decisions with one torch thread, and the load average
of the machine while it ran.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from esper.bench.cli import standalone_main, write_report
from esper.bench.growth import mean_sd, paired

POLICIES = ("gnn", "heuristic", "random")
PAIRS = (("gnn", "heuristic"), ("gnn", "random"), ("heuristic", "random"))


def run_episode_for(task: str, size: str, seed: int, policy: str, policy_path: str, workdir: str,
                    growth_modes: tuple[str, ...] = ()) -> dict[str, Any]:
    """One run of `task` at `size` with `policy` (and `growth_modes` when given); the figures the
    benchmark reports."""
    import torch

    from esper.tamiyo.episodes import run_episode, task_config

    torch.set_num_threads(1)
    extra = [f"controller.policy={policy}", f"controller.random_seed={seed}"]
    if policy == "gnn":
        extra.append(f"controller.policy_path={policy_path}")
    if growth_modes:
        extra.append(f"growth.modes=[{','.join(growth_modes)}]")
    cfg = task_config(task, size, seed, tuple(extra))
    run_dir = Path(workdir) / f"{task}.{size}.s{seed}.{policy}"
    t0 = time.perf_counter()
    summary = run_episode(cfg, run_dir).summary
    adaptations = summary["adaptations"]
    fossilized = sum(1 for a in adaptations if a["outcome"] == "fossilized")
    modes = {m: sum(1 for a in adaptations if a.get("mode", "branch") == m) for m in ("branch", "width", "depth")}
    return {"task": task, "size": size, "seed": seed, "policy": policy, "test_acc": summary["test_acc"],
            "germinations_by_mode": modes,
            "flops": summary["flops"]["total"], "germinations": len(adaptations), "fossilized": fossilized,
            "params_final": summary["params_final"], "wall_s": time.perf_counter() - t0}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task: per-policy means and paired differences (accuracy in points, FLOPs in percent)."""
    out: dict[str, Any] = {}
    for key in sorted({f"{r['task']}:{r['size']}" for r in rows}):
        by = {p: sorted((r for r in rows if f"{r['task']}:{r['size']}" == key and r["policy"] == p),
                        key=lambda r: r["seed"]) for p in POLICIES}
        seeds = sorted(set.intersection(*({r["seed"] for r in by[p]} for p in POLICIES)))
        by = {p: [r for r in by[p] if r["seed"] in seeds] for p in POLICIES}
        policies = {}
        for p in POLICIES:
            acc = [100 * r["test_acc"] for r in by[p]]
            flops = [r["flops"] for r in by[p]]
            germ = sum(r["germinations"] for r in by[p])
            policies[p] = {"test_acc": mean_sd(acc), "flops": mean_sd(flops),
                           "germinations_per_run": germ / max(1, len(by[p])),
                           "germinations_by_mode_per_run": {
                               m: sum(r.get("germinations_by_mode", {}).get(m, 0) for r in by[p]) / max(1, len(by[p]))
                               for m in ("branch", "width", "depth")},
                           "fossilization_rate": sum(r["fossilized"] for r in by[p]) / germ if germ else float("nan")}
        diffs = {}
        for a, b in PAIRS:
            diffs[f"{a} - {b}"] = {
                "accuracy_points": paired([100 * r["test_acc"] for r in by[a]], [100 * r["test_acc"] for r in by[b]]),
                "flops_percent": paired([100 * r["flops"] / rb["flops"] for r, rb in zip(by[a], by[b], strict=True)],
                                        [100.0] * len(by[b])),
            }
        out[key] = {"seeds": seeds, "policies": policies, "paired": diffs}
    return out


def decision_latency(policy_path: str, decisions: int) -> dict[str, float]:
    """p50/p99 wall time of GNNPolicy.decide on a 64-node graph (16 layers x 4 seeds), one thread."""
    import torch

    from esper.lifecycle import SeedLifecycleState as S
    from esper.tamiyo.gnn_policy import GNNPolicy
    from esper.tamiyo.policy import RailsConfig
    from esper.tamiyo.policy_source import load_policy_ref
    from esper.v1 import common_pb2

    torch.set_num_threads(1)
    graph = common_pb2.ModelGraphState(run_id="latency")
    previous: list[str] = []
    for layer in range(16):
        current = []
        for s in range(4):
            node = graph.nodes.add(node_id=f"l{layer}[{s}]", layer_name=f"l{layer}", layer_kind="linear", depth=layer)
            node.output_shape.dims.extend([-1, 128])
            node.seed.seed_index = s
            node.seed.state = int(S.TRAINING if (layer + s) % 7 == 0 else S.DORMANT)
            node.seed.chunk_size = 32
            node.seed.telemetry.gradient_norm = 0.01 * (1 + (layer * 4 + s) % 9)
            node.seed.telemetry.dead_fraction = 0.05 * (s % 3)
            current.append(node.node_id)
        for src in previous:
            for dst in current:
                graph.edges.add(source_node_id=src, target_node_id=dst)
        previous = current
    sig = graph.signals
    sig.epoch, sig.total_epochs = 5, 20
    sig.val_loss_history.extend([1.0, 0.9, 0.85, 0.84, 0.84])
    sig.val_accuracy_history.extend([0.6, 0.65, 0.7, 0.71, 0.71])
    sig.initial_parameter_count, sig.initial_flops_per_sample = 200_000, 400_000.0
    sig.parameter_budget_left = sig.compute_budget_left = 0.8
    policy = GNNPolicy(load_policy_ref(policy_path), RailsConfig(parameter_budget=1.0, compute_budget=1.0))
    for _ in range(30):
        policy.decide(graph)
    times, cpu = [], []
    for _ in range(decisions):
        t0, c0 = time.perf_counter(), time.thread_time()
        policy.decide(graph)
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    times.sort()
    cpu.sort()

    def pct(values: list[float], q: float) -> float:
        return 1e3 * values[min(len(values) - 1, int(q * len(values)))]

    # Wall time is what a caller waits; CPU time of the deciding thread is what the decision costs
    # when the machine is shared (on an oversubscribed machine the two differ by the waiting).
    return {"nodes": len(graph.nodes), "edges": len(graph.edges), "decisions": decisions,
            "p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99), "mean_ms": 1e3 * statistics.fmean(times),
            "cpu_p50_ms": pct(cpu, 0.5), "cpu_p99_ms": pct(cpu, 0.99), "load_average_1min": os.getloadavg()[0]}


def to_markdown(result: dict[str, Any], command: str) -> str:
    lines = ["# Tamiyo policy benchmark: gnn vs heuristic vs random", "", f"Command: `{command}`", "",
             f"Policy: `{result['policy_path']}` version `{result['policy_version']}`; training tasks "
             f"{result['training_tasks']}; held-out task(s): {result['heldout_tasks']}; growth modes: "
             f"{result.get('growth_modes', 'task config')}; wall {result['wall_s']:.0f} s.",
             "Accuracy is test accuracy in percent (the test split is never seen by training or any decision); "
             "FLOPs are the run's total (training, validation, counterfactual evaluations).", ""]
    for key, agg in result["aggregate"].items():
        tag = " (held-out task)" if key.split(":")[0] in result["heldout_tasks"] else " (held-out seeds)"
        lines += [f"## {key}{tag}: {len(agg['seeds'])} paired seeds", "",
                  "| policy | test acc (%) | FLOPs | germinations/run | branch/width/depth per run | fossilization rate |",
                  "|---|---|---|---|---|---|"]
        for p, v in agg["policies"].items():
            by_mode = "/".join(f"{x:.2f}" for x in v.get("germinations_by_mode_per_run", {}).values())
            lines.append(f"| {p} | {v['test_acc'][0]:.2f} ± {v['test_acc'][1]:.2f} | {v['flops'][0]:.3e} ± "
                         f"{v['flops'][1]:.1e} | {v['germinations_per_run']:.2f} | {by_mode} | "
                         f"{v['fossilization_rate']:.2f} |")
        lines += ["", "| paired difference | acc mean (points) | sd | wins/N | p | FLOPs mean (%) | p (FLOPs) |",
                  "|---|---|---|---|---|---|---|"]
        for name, d in agg["paired"].items():
            a, f = d["accuracy_points"], d["flops_percent"]
            lines.append(f"| {name} | {a['mean']:+.2f} | {a['sd']:.2f} | {a['wins']}/{a['n']} | {a['p_value']:.3g} | "
                         f"{f['mean']:+.1f} | {f['p_value']:.3g} |")
        lines.append("")
    lat = result.get("latency")
    if lat:
        lines += [f"Decision latency (GNNPolicy.decide, {lat['nodes']}-node graph, {lat['edges']} edges, one torch "
                  f"thread, {lat['decisions']} decisions): p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
                  f"mean {lat['mean_ms']:.2f} ms; CPU time of the deciding thread p50 {lat.get('cpu_p50_ms', 0):.2f} ms, "
                  f"p99 {lat.get('cpu_p99_ms', 0):.2f} ms; 1-minute load average during the measurement "
                  f"{lat['load_average_1min']:.1f}.", ""]
    return "\n".join(lines)


def _training_tasks(manifest: dict[str, Any]) -> list[str]:
    return list(manifest.get("training", {}).get("data", {}).get("tasks", []))


def run(args: argparse.Namespace) -> int:
    from esper.tamiyo.policy_source import is_urza_ref, load_policy_ref

    loaded = load_policy_ref(args.policy)
    manifest = loaded.manifest
    training_tasks = _training_tasks(manifest)
    heldout = [t for t in args.heldout_task]
    leaked = [t for t in heldout if t in training_tasks]
    if leaked:
        print(f"esper-bench policy: error: held-out task(s) {leaked} are in the policy's training data "
              f"{training_tasks}; expected tasks absent from it", file=sys.stderr)
        return 2
    from esper.tamiyo.collect import parse_seeds

    seeds = parse_seeds(args.seeds)
    tasks = [t.split(":", 1) for t in args.tasks.split(",") if t]
    workdir = args.workdir or tempfile.mkdtemp(prefix="esper-bench-policy-")
    policy_path = args.policy if is_urza_ref(args.policy) else str(Path(args.policy).resolve())
    modes = tuple(m for m in args.growth_modes.split(",") if m)
    jobs = [(task, size, seed, p, policy_path, workdir, modes) for task, size in tasks for seed in seeds
            for p in POLICIES]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_episode_for, *j) for j in jobs]
            for i, fut in enumerate(futures, 1):
                rows.append(fut.result())
                r = rows[-1]
                print(f"[{i}/{len(jobs)}] {r['task']}:{r['size']} seed {r['seed']} {r['policy']}: test acc "
                      f"{100 * r['test_acc']:.2f}, {r['germinations']} germinations ({r['wall_s']:.1f} s)", flush=True)
    else:
        for i, j in enumerate(jobs, 1):
            rows.append(run_episode_for(*j))
            r = rows[-1]
            print(f"[{i}/{len(jobs)}] {r['task']}:{r['size']} seed {r['seed']} {r['policy']}: test acc "
                  f"{100 * r['test_acc']:.2f}, {r['germinations']} germinations ({r['wall_s']:.1f} s)", flush=True)
    result = {"policy_path": policy_path, "policy_version": loaded.version, "training_tasks": training_tasks,
              "heldout_tasks": heldout, "seeds": seeds, "tasks": [":".join(t) for t in tasks],
              "growth_modes": list(modes) or "task config",
              "wall_s": time.perf_counter() - start, "aggregate": aggregate(rows), "rows": rows}
    if args.latency_decisions > 0:
        result["latency"] = decision_latency(policy_path, args.latency_decisions)
    command = "esper-bench policy " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[2:]))
    write_report(to_markdown(result, command), result, args.json, args.markdown)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `esper-bench policy`."""
    p.add_argument("--policy", required=True,
                   help="the learned policy: its directory (esper-tamiyo-train --out) or urza://HOST:PORT/NAME[@VERSION]")
    p.add_argument("--growth-modes", default="",
                   help="growth.modes for every policy, e.g. branch,width,depth (default: each task's config)")
    p.add_argument("--tasks", default="digits-mlp:w32,mnist1d-cnn1d:w8",
                   help="comma-separated task:size pairs (esper.tamiyo.episodes.TASKS)")
    p.add_argument("--heldout-task", action="append", default=[],
                   help="a task that must be absent from the policy's training data (repeatable)")
    p.add_argument("--seeds", default="0-19", help="paired run seeds, e.g. 0-19 (keep them out of the collection)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--latency-decisions", type=int, default=1000, help="decisions timed for the latency (0: skip)")
    p.add_argument("--workdir", help="where run directories go (default: a temporary directory)")
    p.add_argument("--json")
    p.add_argument("--markdown")


def main(argv: list[str] | None = None) -> int:
    return standalone_main(__name__, argv)


if __name__ == "__main__":
    sys.exit(main())
