"""``esper-bench services-ii``: decision round trip and germination latency of the full system.

Measured in one run, every server a real process on 127.0.0.1:

- baseline: Tamiyo GetPolicyInfo (an almost empty unary call on the same server), p50/p99;
- Tamiyo Decide on a real ModelGraphState (the digits MLP of configs/development.yaml), p50/p99
  and its ratio to the baseline; target 2 ms p99;
- the decision round trip as Tolaria does it: `RemoteController.decide` on the training thread
  -> the adaptation worker thread -> Decide -> the reply back in the training thread's queue;
- germination latency from decision to seed active, cold (compile needed) and warm (kernel in the
  cache), with the training steps completed meanwhile: a real `esper-train` run in services mode
  local on the development config, read from its summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
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

    from esper.serving import ServerProcess, open_sync_channel
    from esper.tolaria.remote import RemoteController, RemoteSettings
    from esper.v1 import tamiyo_pb2, tamiyo_pb2_grpc

    trainer, graph = real_graph_and_trainer(work_dir)
    policy = work_dir / "policy.yaml"
    policy.write_text(yaml.safe_dump({"grow_without_plateau": True, "cooldown_epochs": 0, "max_concurrent": 2}))
    server = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                            str(work_dir / "replay"), "--policy-config", str(policy)],
                           stderr_path=work_dir / "tamiyo.log")
    results: dict[str, Any] = {}
    with server, open_sync_channel(server.address) as channel:
        stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)

        def timed(call) -> list[float]:
            for _ in range(warmup):
                call()
            out = []
            for _ in range(calls):
                t0 = time.perf_counter()
                call()
                out.append((time.perf_counter() - t0) * 1000)
            return out

        results["baseline_policy_info"] = _summary_ms(
            timed(lambda: stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=5)))
        request = tamiyo_pb2.DecideRequest(graph=graph)
        results["decide_rpc"] = _summary_ms(timed(lambda: stub.Decide(request, timeout=5)))
        # Tolaria's own path: training thread -> worker thread -> Tamiyo -> queue read by the trainer.
        controller = RemoteController(trainer.morph, RemoteSettings(addresses={}), work_dir / "rc-run")
        controller.connect({"tamiyo": server.address})
        try:
            samples = []
            for i in range(warmup + calls):
                t0 = time.perf_counter()
                controller.decide(graph)
                while controller._outbox.empty():
                    time.sleep(0)  # the training thread polls at its next boundary; here: at once
                while not controller._outbox.empty():
                    controller._outbox.get_nowait()
                if i >= warmup:
                    samples.append((time.perf_counter() - t0) * 1000)
            results["round_trip_tolaria"] = _summary_ms(samples)
        finally:
            controller.close()
    return results


def bench_germination(work_dir: Path, epochs: int, timeout_s: float) -> dict[str, Any]:
    """A real esper-train run (services local) on the development config; its germinations."""
    run_dir = work_dir / "system-run"
    env = dict(os.environ, ESPER_SERVICES_MODE="local")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "esper.tolaria.cli", "--config", str(DEV_CONFIG), "--output-dir", str(run_dir),
         "--progress", "plain", f"train.epochs={epochs}", "logging.tensorboard=false",
         "logging.timeline_plot=false", "lifecycle.germination_timeout_epochs=200"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"esper-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    services = summary["services"]
    rows = services.get("germinations", [])
    out: dict[str, Any] = {"wall_s": time.perf_counter() - started, "germinations": rows,
                           "step_times": services.get("step_times", {}),
                           "decisions_in_run": services.get("decisions", 0)}
    for path in ("cold", "warm"):
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
    for path in ("cold", "warm"):
        row = g.get(path)
        if row:
            lines.append(f"| {path} ({'compile needed' if path == 'cold' else 'kernel cached'}) | {row['n']} | "
                         f"{row['latency_s_median'] * 1000:.1f} ms | {row['latency_s_max'] * 1000:.1f} ms | "
                         f"{row['steps_meanwhile_median']:.0f} |")
        else:
            lines.append(f"| {path} | 0 | - | - | - |")
    steps = g.get("step_times", {})
    if steps.get("during_compile", {}).get("n"):
        a, c = steps["all"], steps["during_compile"]
        lines += ["", f"training steps: median {a['median_ms']:.2f} ms over {a['n']} steps; while a kernel was "
                      f"compiling: median {c['median_ms']:.2f} ms, slowest {c['max_ms']:.2f} ms over {c['n']} steps "
                      f"(slowest / overall median = {steps.get('max_during_compile_over_median', float('nan')):.2f}x)"]
    return "\n".join(lines)


def bench_adaptation(work_dir: Path, calls: int, warmup: int, epochs: int = 20,
                     germination: bool = True) -> dict[str, Any]:
    """Every figure of this module (what `esper-bench services` adds to its table)."""
    results: dict[str, Any] = {"decisions": bench_decisions(work_dir, calls, warmup)}
    if germination:
        results["germination"] = bench_germination(work_dir, epochs, timeout_s=900)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per latency figure")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the germination run")
    parser.add_argument("--skip-germination", action="store_true", help="only the decision latencies")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="esper-bench-services-ii-") as tmp:
        results = bench_adaptation(Path(tmp), args.calls, args.warmup, args.epochs, not args.skip_germination)
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
