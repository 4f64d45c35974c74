"""``esper-bench services-ii``: decision round trip and germination latency of the full system.

Measured in one run, every server a real process on 127.0.0.1:

- baseline: Tamiyo GetPolicyInfo (an almost empty unary call on the same server), p50/p99;
- Tamiyo Decide on a real ModelGraphState (the digits MLP of configs/development.yaml), p50/p99
  and its ratio to the baseline; target 2 ms p99;
- the decision round trip as Tolaria does it: `RemoteController.decide` on the training thread
  -> the adaptation worker thread -> Decide -> the reply back in the training thread's queue;
- germination latency from decision to seed active, cold (compile needed), library (artifact
  already in Urza) and warm (kernel in the run's cache), with the training steps completed
  meanwhile: two real `esper-train` runs on the development config against services started here,
  read from their summary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEV_CONFIG = ROOT / "configs" / "development.yaml"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _summary_ms(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": _percentile(samples_ms, 50), "p99_ms": _percentile(samples_ms, 99),
            "mean_ms": statistics.fmean(samples_ms), "n": len(samples_ms)}


def real_graph_and_trainer(work_dir: Path):
    """A prepared Trainer (services off) on the development config, and one real ModelGraphState."""
    from esper.tolaria.config import load_config
    from esper.tolaria.trainer import Trainer

    cfg = load_config(DEV_CONFIG, ["services.mode=off", "services.tolaria_port=-1"])
    trainer = Trainer(cfg, work_dir / "graph-run")
    trainer.prepare()
    graph = trainer.morph.graph_state(3, 100, cfg.train.epochs, 1.0, 0.9, 0.8, [1.0, 0.999, 0.998])
    graph.signals.initial_flops_per_sample = float(trainer.morph.flops_initial)
    return trainer, graph


def bench_decisions(work_dir: Path, calls: int, warmup: int) -> dict[str, Any]:
    """Baseline, raw Decide and the RemoteController round trip against one real Tamiyo server."""
    import yaml

    from esper.clients import TamiyoClient
    from esper.serving import ServerProcess
    from esper.tolaria.adaptation import RemoteController
    from esper.tolaria.services_config import ServicesConfig

    trainer, graph = real_graph_and_trainer(work_dir)
    policy = work_dir / "policy.yaml"
    policy.write_text(yaml.safe_dump({"grow_without_plateau": True, "cooldown_epochs": 0, "max_concurrent": 2}))
    server = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                            str(work_dir / "replay"), "--policy-config", str(policy)],
                           stderr_path=work_dir / "tamiyo.log")
    results: dict[str, Any] = {}

    async def rpc_samples() -> dict[str, list[float]]:
        # The client Tolaria uses (esper.clients), on one asyncio loop as in Tolaria's worker thread.
        async with TamiyoClient(server.address, timeout_s=5) as client:
            async def timed(call) -> list[float]:
                for _ in range(warmup):
                    await call()
                out = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    await call()
                    out.append((time.perf_counter() - t0) * 1000)
                return out

            return {"baseline_policy_info": await timed(client.get_policy_info),
                    "decide_rpc": await timed(lambda: client.decide(graph))}

    with server:
        for key, samples in asyncio.run(rpc_samples()).items():
            results[key] = _summary_ms(samples)
        # Tolaria's own path: training thread -> worker thread -> Tamiyo -> queue read by the trainer.
        controller = RemoteController(trainer.morph, ServicesConfig(mode="remote"), work_dir / "rc-run")
        controller.connect({"tamiyo": server.address})
        try:
            samples = []
            for i in range(warmup + calls):
                t0 = time.perf_counter()
                controller.decide(graph)
                # The moment the reply is in the training thread's queue (read there at its next
                # step boundary). A blocking get releases the GIL like a training thread inside its
                # torch ops; spinning on the queue would take the GIL from the worker thread.
                try:
                    controller.outbox.wait(timeout=10.0)
                except queue.Empty:
                    raise RuntimeError(f"no decision came back within 10 s: {controller.paused()[1]}") from None
                if i >= warmup:
                    samples.append((time.perf_counter() - t0) * 1000)
                controller.outbox.drain()
                controller.decisions.future.result(timeout=10)  # the worker finished that call
            results["round_trip_tolaria"] = _summary_ms(samples)
        finally:
            controller.close()
    return results


def bench_germination(work_dir: Path, epochs: int, timeout_s: float, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Two real esper-train runs against one set of services (started here, services.mode remote).

    Run 1 finds no artifact: its first germination compiles (cold); a later germination of the
    same kernel finds it in the in-process kernel cache (warm). Run 2 starts with an empty kernel
    cache but finds the artifact in Urza (library: download, verify, load; no compile).
    One blueprint and a 3-epoch cooldown make the second germination come after the first kernel.
    """
    from esper.cpus import format_cpus, on_cpus, plan_partition
    from esper.local_stack import LocalStack
    from esper.tolaria.services import TEZZERET_NICENESS

    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    # The same CPU partition as services.mode local: the services on their CPU(s), the runs told so.
    partition = plan_partition("auto")
    cpus = [f"services.cpus={format_cpus(partition.services)}"] if partition else ["services.cpus=off"]
    stack = LocalStack(["urza", "oona", "tezzeret", "tamiyo"], state_dir=work_dir / "services",
                       die_with_parent=True, niceness={"tezzeret": TEZZERET_NICENESS})
    with on_cpus(partition.services if partition else None):
        stack.start()
    try:
        addresses = [f"services.addresses.{name}={address}" for name, address in stack.addresses.items()]
        for run in (1, 2):
            run_dir = work_dir / f"system-run-{run}"
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "esper.tolaria.cli", "--config", str(DEV_CONFIG), "--output-dir",
                 str(run_dir), "--progress", "plain", f"train.epochs={epochs}", "logging.tensorboard=false",
                 "logging.timeline_plot=false", "lifecycle.germination_timeout_epochs=200",
                 "seeds.blueprints=[residual_mlp]", "controller.cooldown_epochs=3", f"run_name=bench-{run}",
                 "services.mode=remote", *addresses, *cpus, *extra],
                env=dict(os.environ), cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(f"esper-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            services = json.loads((run_dir / "summary.json").read_text())["services"]
            rows += [dict(g, run=run) for g in services.get("germinations", [])]
            runs.append({"run": run, "wall_s": time.perf_counter() - started,
                         "step_times": services.get("step_times", {}), "decisions": services.get("decisions", 0)})
    finally:
        stack.stop()
    out: dict[str, Any] = {"germinations": rows, "runs": runs, "step_times": runs[0]["step_times"]}
    for path in ("cold", "library", "warm"):
        chosen = [r for r in rows if r["path"] == path]
        if chosen:
            out[path] = {"n": len(chosen), "latency_s_median": statistics.median(r["latency_s"] for r in chosen),
                         "latency_s_max": max(r["latency_s"] for r in chosen),
                         "steps_meanwhile_median": statistics.median(r["steps_meanwhile"] for r in chosen)}
    return out


def format_table(results: dict[str, Any]) -> str:
    d = results["decisions"]
    base = d["baseline_policy_info"]["p99_ms"]
    lines = ["| measurement | p50 | p99 | ratio p99 / baseline p99 |", "|---|---|---|---|"]
    for key, label in (("baseline_policy_info", "baseline: Tamiyo GetPolicyInfo (near-empty unary)"),
                       ("decide_rpc", "Tamiyo Decide (real graph)"),
                       ("round_trip_tolaria", "decision round trip Tolaria -> Tamiyo -> back (target p99 2 ms)")):
        row = d[key]
        lines.append(f"| {label} | {row['p50_ms']:.3f} ms | {row['p99_ms']:.3f} ms | {row['p99_ms'] / base:.2f}x |")
    g = results.get("germination", {})
    lines += ["", "| germination (decision -> seed active) | n | median | max | training steps meanwhile (median) |",
              "|---|---|---|---|---|"]
    labels = {"cold": "cold (compile needed)", "library": "artifact in Urza (download + load, no compile)",
              "warm": "warm (kernel cached in the run)"}
    for path in ("cold", "library", "warm"):
        row = g.get(path)
        if row:
            lines.append(f"| {labels[path]} | {row['n']} | "
                         f"{row['latency_s_median'] * 1000:.1f} ms | {row['latency_s_max'] * 1000:.1f} ms | "
                         f"{row['steps_meanwhile_median']:.0f} |")
        else:
            lines.append(f"| {path} | 0 | - | - | - |")
    steps = g.get("step_times", {})
    if steps.get("all", {}).get("n"):
        lines += ["", "| training steps (run 1) | n | median | p95 | slowest | slowest / overall median |",
                  "|---|---|---|---|---|---|"]
        median = steps["all"]["median_ms"]
        for key, label in (("all", "all steps"), ("no_adaptation", "no kernel in flight"),
                           ("during_compile", "while Tezzeret compiled a kernel (target 1.5x)"),
                           ("during_load", "while the trainer downloaded and loaded a kernel")):
            row = steps.get(key, {})
            if row.get("n"):
                lines.append(f"| {label} | {row['n']} | {row['median_ms']:.2f} ms | {row['p95_ms']:.2f} ms | "
                             f"{row['max_ms']:.2f} ms | {row['max_ms'] / median:.2f}x |")
            else:
                lines.append(f"| {label} | 0 | - | - | - | - |")
    return "\n".join(lines)


def bench_adaptation(work_dir: Path, calls: int, warmup: int, epochs: int = 20,
                     germination: bool = True, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every figure of this module (what `esper-bench services` adds to its table)."""
    results: dict[str, Any] = {"decisions": bench_decisions(work_dir, calls, warmup)}
    if germination:
        results["germination"] = bench_germination(work_dir, epochs, timeout_s=900, extra=tuple(overrides))
        results["germination"]["overrides"] = list(overrides)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per latency figure")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the germination run")
    parser.add_argument("--skip-germination", action="store_true", help="only the decision latencies")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the germination runs, e.g. data.batch_size=256 model.width=256 "
                             "for training steps of a few ms instead of the development config's ~0.5 ms")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="esper-bench-services-ii-") as tmp:
        results = bench_adaptation(Path(tmp), args.calls, args.warmup, args.epochs, not args.skip_germination,
                                   tuple(args.overrides))
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esper-bench services-ii", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
