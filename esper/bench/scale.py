"""`esper-bench scale`: steps per second and the loss curve of esper-train at 1, 2, ... ranks.

Each arm is one `esper-train --nproc N` run (torchrun, gloo on CPU, NCCL on CUDA) of the same
config with the same *global* batch, so the arms train the same model on the same batches (strong
scaling) and their loss curves must agree; the baseline is the 1-rank arm of the same invocation.
Throughput is optimizer steps (and samples) per second of the training loop as the run measures
it (`wall_s` in summary.json: epochs including their validation, not the process start-up).
Scaling efficiency = (steps/s at N ranks / steps/s at 1 rank) / N. Every rank runs
`--threads-per-rank` intra-op threads, so an arm uses N x threads cores of the machine's
`os.cpu_count()`, both stated with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_OVERRIDES = ["model.width=256", "data.batch_size=256", "train.epochs=6", "optim.momentum=0.0",
                     "optim.lr=0.2", "lifecycle.min_contribution=-1.0"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/development.yaml", help="esper-train config of every arm")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (the first is the baseline)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="intra-op threads of each rank")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--markdown", help="write the report here (e.g. benchmarks/results/scale.md)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"config overrides for every arm (default: {' '.join(DEFAULT_OVERRIDES)})")


def _arm(args: argparse.Namespace, nproc: int, run_dir: Path) -> dict[str, Any]:
    overrides = list(args.overrides or DEFAULT_OVERRIDES)
    cmd = [sys.executable, "-m", "esper.tolaria.cli", "--nproc", str(nproc), "--config", args.config,
           "--device", args.device, "--output-dir", str(run_dir), "--progress", "none", *overrides,
           f"train.torch_threads={args.threads_per_rank}", "logging.tensorboard=false",
           "logging.timeline_plot=false", "services.mode=off", "services.tolaria_port=-1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{nproc}-rank arm failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["loss"] for r in records if r["scope"] == "step"}
    epochs = [r for r in records if r["scope"] == "epoch"]
    from esper.tolaria.config import load_config

    batch = load_config(args.config, overrides).data.batch_size
    wall = summary["wall_s"]
    return {
        "ranks": nproc, "cores": nproc * args.threads_per_rank, "global_batch": batch,
        "per_rank_batch": batch // nproc, "steps": summary["global_step"], "wall_s": wall,
        "steps_per_s": summary["global_step"] / wall, "samples_per_s": summary["global_step"] * batch / wall,
        "final_val_acc": summary["final_val_acc"], "test_acc": summary["test_acc"], "seeds": summary["seeds"],
        "step_loss": steps,
        "epochs": [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_loss": r["val_loss"],
                    "val_acc": r["val_acc"], "wall_s": r["wall_s"]} for r in epochs],
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every arm; the figures as one JSON-able dict."""
    counts = [int(n) for n in args.ranks.split(",")]
    load_before = os.getloadavg()[0]
    arms = []
    with tempfile.TemporaryDirectory(prefix="esper-scale-") as tmp:
        for n in counts:
            arms.append(_arm(args, n, Path(tmp) / f"ranks{n}"))
    base = arms[0]
    for arm in arms:
        arm["speedup"] = arm["steps_per_s"] / base["steps_per_s"]
        arm["efficiency"] = arm["speedup"] / (arm["ranks"] / base["ranks"])
        common = sorted(set(arm["step_loss"]) & set(base["step_loss"]))
        arm["max_rel_step_loss_diff"] = max(
            (abs(arm["step_loss"][s] - base["step_loss"][s]) / abs(base["step_loss"][s]) for s in common), default=0.0)
    return {"command": "esper-bench scale " + shlex.join(args.argv if getattr(args, "argv", None) else []),
            "cpu_count": os.cpu_count(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "device": args.device, "threads_per_rank": args.threads_per_rank,
            "overrides": list(args.overrides or DEFAULT_OVERRIDES), "config": args.config, "arms": arms}


def markdown(fig: dict[str, Any]) -> str:
    """The report: the exact command, the machine, one row per arm, the loss curves."""
    lines = ["# esper-bench scale", "", "```", fig["command"], "```", "",
             f"Machine: {fig['cpu_count']} CPU cores ({fig['machine']}), device {fig['device']}; every rank "
             f"runs {fig['threads_per_rank']} intra-op thread(s). Config {fig['config']} with "
             f"`{' '.join(fig['overrides'])}`; the global batch is the same in every arm (strong scaling). "
             f"1-minute load average before / after: {fig['load_average_1min'][0]:.1f} / "
             f"{fig['load_average_1min'][1]:.1f} (other processes share the cores).", "",
             "| ranks | cores used | global / per-rank batch | steps | wall s | steps/s | samples/s | speedup | "
             "efficiency | final val acc | max rel. step-loss diff vs 1st arm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in fig["arms"]:
        lines.append(
            f"| {a['ranks']} | {a['cores']} of {fig['cpu_count']} | {a['global_batch']} / {a['per_rank_batch']} | "
            f"{a['steps']} | {a['wall_s']:.1f} | {a['steps_per_s']:.2f} | {a['samples_per_s']:.0f} | "
            f"{a['speedup']:.2f} | {a['efficiency']:.2f} | {a['final_val_acc']:.4f} | "
            f"{a['max_rel_step_loss_diff']:.2e} |")
    lines += ["", "Loss curve (per epoch):", "",
              "| epoch | " + " | ".join(f"train / val loss, {a['ranks']} rank(s)" for a in fig["arms"]) + " |",
              "|---|" + "---|" * len(fig["arms"])]
    for i, row in enumerate(fig["arms"][0]["epochs"]):
        cells = []
        for a in fig["arms"]:
            e = a["epochs"][i] if i < len(a["epochs"]) else None
            cells.append(f"{e['train_loss']:.4f} / {e['val_loss']:.4f}" if e else "-")
        lines.append(f"| {row['epoch']} | " + " | ".join(cells) + " |")
    lines += ["", "Seeds by final state: " + "; ".join(f"{a['ranks']} rank(s) {a['seeds']}" for a in fig["arms"]), ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    fig = measure(args)
    text = markdown(fig)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        slim = dict(fig, arms=[{k: v for k, v in a.items() if k != "step_loss"} for a in fig["arms"]])
        Path(args.json).write_text(json.dumps(slim, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esper-bench scale", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
