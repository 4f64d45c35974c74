"""``esper-tamiyo-train``: fit the Tamiyo GNN policy offline from replay data (AWR with a behaviour-cloning
prior on the heuristic's recorded choices, ``--bc-weight``; `esper.tamiyo.offline`).

    esper-tamiyo-train --replay replay/ --out policies/gnn --epochs 30 --tensorboard runs/tamiyo-train

Reads every field report under ``--replay`` (files or directories), splits them by run into
training and validation, trains, keeps the epoch whose greedy policy scores best on the validation runs, and
writes the policy directory (safetensors + manifest, `esper.tamiyo.policy_store`) and
``train_report.json`` next to it. Progress: a rich bar on a terminal, one line per epoch
otherwise; TensorBoard scalars with ``--tensorboard``. Bad or foreign replay files exit with
status 2 and a message naming the file. ``--publish-urza HOST:PORT`` then stores the policy in
that Urza as the next version of ``--publish-name`` (default gnn) and prints the reference
(``urza://HOST:PORT/gnn@N``) that ``controller.policy_path`` and ``esper-tamiyo --policy`` accept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from esper.errors import EsperError
from esper.tamiyo.offline import ReplayDataError, TrainSettings, load_replay, train


def build_parser() -> argparse.ArgumentParser:
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="esper-tamiyo-train", description="Train the Tamiyo GNN policy offline (AWR).")
    p.add_argument("--replay", nargs="+", required=True, type=Path, help="replay files or directories")
    p.add_argument("--out", required=True, type=Path, help="policy directory to write (replaced atomically)")
    p.add_argument("--publish-urza", metavar="HOST:PORT", default="",
                   help="also publish the trained policy to this Urza as the next version of --publish-name")
    p.add_argument("--publish-name", default="gnn", help="policy name in Urza (default: gnn)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta", type=float, default=d.beta, help="AWR temperature, in reward units (accuracy points)")
    p.add_argument("--bc-weight", type=float, default=d.bc_weight,
                   help="weight of the behaviour-cloning term on the reports' reference (heuristic) action, "
                        "next to the AWR term (0: plain AWR)")
    p.add_argument("--reward", choices=["contribution", "shadow-return"], default="contribution",
                   help="contribution: each report's own reward (contribution-minus-flops/1); shadow-return: the "
                        "episode's final validation accuracy and FLOPs against its no-growth shadow, for every "
                        "decision of it (needs esper-tamiyo collect --shadows)")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers, help="message-passing layers (2-4)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="fraction of runs held out")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--version", default=None, help="version string of the policy (default: time + weights hash)")
    p.add_argument("--tensorboard", type=Path, default=None, help="TensorBoard log directory")
    p.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (the graphs are tiny: more threads mostly add contention)")
    return p


def _settings(args: argparse.Namespace) -> TrainSettings:
    s = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, beta=args.beta, hidden=args.hidden,
                      layers=args.layers, val_fraction=args.val_fraction, seed=args.seed, bc_weight=args.bc_weight)
    checks = {"--epochs": s.epochs >= 1, "--batch-size": s.batch_size >= 1, "--lr": s.lr > 0, "--beta": s.beta > 0,
              "--hidden": s.hidden >= 4, "--layers": 2 <= s.layers <= 4, "--val-fraction": 0 < s.val_fraction < 1,
              "--bc-weight": s.bc_weight >= 0}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{bad[0]}={getattr(s, bad[0][2:].replace('-', '_'))} is out of range; expected epochs, "
                         "batch size >= 1, lr and beta > 0, hidden >= 4, layers 2..4, val fraction in (0, 1), "
                         "bc weight >= 0")
    return s


def run(args: argparse.Namespace) -> int:
    from esper.tamiyo.policy_store import save_policy

    settings = _settings(args)
    import torch

    torch.set_num_threads(max(1, args.threads))
    mode = args.progress
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "plain"
    echo = (lambda s: None) if mode == "none" else print
    t0 = time.perf_counter()
    data = load_replay(args.replay, echo=echo, reward=args.reward)
    echo(f"replay: {len(data.samples)} samples from {len(data.runs)} runs in {len(data.files)} file(s), reward "
         f"{data.reward_definition}; "
         f"skipped {data.skipped}; data sha256 {data.data_sha256[:16]}")
    writer = None
    if args.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.tensorboard))
    progress = task = None
    if mode == "rich":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]tamiyo-train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        task = progress.add_task("train", total=settings.epochs, info="")
        progress.start()

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        line = (f"epoch {epoch}/{settings.epochs} train pi {m['train/policy_loss']:.4f} v {m['train/value_loss']:.3f} "
                f"| val pi {m.get('val/policy_loss', float('nan')):.4f} v {m.get('val/value_loss', float('nan')):.3f} "
                f"agree {m.get('val/agreement', float('nan')):.2f} ref {m.get('val/ref_agreement', float('nan')):.2f} "
                f"snips {m.get('val/snips_mean_reward', float('nan')):+.3f}")
        if writer is not None:
            for k, v in m.items():
                writer.add_scalar(k, v, epoch)
        if progress is not None:
            progress.update(task, advance=1, info=line.split(" ", 2)[2])
        elif mode == "plain":
            print(line, flush=True)

    try:
        model, report = train(data, settings, on_epoch=on_epoch)
    finally:
        if progress is not None:
            progress.stop()
        if writer is not None:
            writer.close()
    report["train_seconds"] = round(time.perf_counter() - t0, 2)
    best = report["best_metrics"]
    metrics = {k.replace("/", "_"): round(v, 6) for k, v in best.items()}
    manifest = save_policy(args.out, model, training_data_sha256=data.data_sha256, version=args.version,
                           training={k: v for k, v in report.items() if k not in ("history", "best_metrics")},
                           metrics=metrics)
    report["policy_version"] = manifest["version"]
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    if mode != "none":
        print(f"\nTamiyo policy {manifest['version']} -> {args.out}")
        print(f"  data: {report['data']['samples']} samples, {report['data']['train_runs']} training runs, "
              f"{report['data']['val_runs']} validation runs (split by run)")
        print(f"  best epoch {report['best_epoch']}/{settings.epochs}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in best.items()))
        print(f"  trained in {report['train_seconds']} s; report: {args.out / 'train_report.json'}")
    if args.publish_urza:
        from esper.tamiyo.policy_source import UrzaPolicyRef, publish_to_urza

        record, created = publish_to_urza(args.out, args.publish_urza, args.publish_name)
        ref = UrzaPolicyRef(args.publish_urza, record.name, record.version)
        print(f"{'published' if created else 'already in Urza as'} {ref} ({record.policy_version})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ReplayDataError, ValueError) as exc:
        print(f"esper-tamiyo-train: error: {exc}", file=sys.stderr)
        return 2
    except EsperError as exc:  # publishing to Urza failed (unreachable, refused)
        print(f"esper-tamiyo-train: error: --publish-urza {args.publish_urza}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
