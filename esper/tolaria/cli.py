"""`esper-train`: train a host model while Esper grows seeds in it.

    esper-train --config configs/development.yaml optim.lr=0.01 model.width=64 --output-dir runs/dev
    esper-train --output-dir runs/dev --resume auto
    esper-train --config configs/mnist1d.yaml --no-morphogenetic      # the static baseline

Bad input (config, data, checkpoint, an architecture-changing resume) exits with status 2 and a
one-line message on stderr, before anything in the run directory is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import (
    Config,
    ConfigError,
    apply_override,
    from_dict,
    load_config,
    parse_override,
    to_yaml,
    validate,
)

USAGE_ERROR = 2


class UsageError(ValueError):
    """A command line that cannot run as given."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2 (argparse prints the usage too)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="esper-train", description="Morphogenetic training: grow seeds in a host model while it trains.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=0.01")
    p.add_argument("--config", help="YAML config file (defaults < file < overrides)")
    p.add_argument("--output-dir", help="run directory (default runs/<run_name>)")
    p.add_argument("--resume", metavar="auto|PATH", help="auto: latest complete checkpoint of --output-dir if any; "
                   "PATH: a run directory or checkpoints/epoch_NNNN")
    p.add_argument("--data-dir", help="dataset directory (sets data.data_dir)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="sets train.device")
    p.add_argument("--tamiyo-policy", metavar="PATH",
                   help="let the learned Tamiyo policy in PATH decide (sets controller.policy=gnn and policy_path)")
    p.add_argument("--no-morphogenetic", action="store_true", help="same run, seeds never germinate (the baseline)")
    p.add_argument("--dry-run", action="store_true", help="validate config, data and environment, print the config, exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto",
                   help="rich bars on a terminal (auto), one plain line per epoch, or nothing")
    p.add_argument("--verbose", action="store_true", help="print every lifecycle event")
    p.add_argument("--check-services", action="store_true",
                   help="report the health of the run's services (services.mode local: start them, check, stop)")
    p.add_argument("--services-only", action="store_true",
                   help="start the run's services (services.mode local), print their addresses, wait for Ctrl-C")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < --config file (or the resumed checkpoint's config) < overrides < flags."""
    overrides = list(args.overrides)
    if args.tamiyo_policy:
        # First, so an explicit controller.policy=... on the command line still wins.
        overrides[:0] = ["controller.policy=gnn", f"controller.policy_path={Path(args.tamiyo_policy).resolve()}"]
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.config is None and args.resume is not None:
        path = _resume_path(args)
        if path is not None:
            base = from_dict(ckpt.load_checkpoint(path)["config"])
            for text in overrides:
                key, value = parse_override(text)
                apply_override(base, key, value)
            validate(base)
            return base
    return load_config(args.config, overrides)


def _resume_path(args: argparse.Namespace) -> Path | None:
    if args.resume == "auto":
        if args.output_dir is None:
            raise UsageError("--resume auto needs --output-dir (the run directory to continue)")
        return ckpt.latest_checkpoint(Path(args.output_dir))
    return ckpt.resolve_checkpoint(Path(args.resume))


def run(args: argparse.Namespace) -> int:
    from esper.tolaria.trainer import Trainer

    config = resolve_config(args)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    run_dir = Path(args.output_dir) if args.output_dir else Path("runs") / config.run_name
    if args.check_services or args.services_only:
        from esper.tolaria.services import services_command

        return services_command(config, run_dir, check=args.check_services)
    from esper.tolaria.services import RunServices

    services = RunServices(config, run_dir)
    trainer = Trainer(config, run_dir, morphogenetic=not args.no_morphogenetic, verbose=args.verbose,
                      progress=args.progress, resume=args.resume)
    services.install(trainer)
    trainer.prepare()  # validates config, data, model and checkpoint; writes nothing
    if args.resume is None and not args.dry_run and _holds_run(run_dir):
        raise UsageError(
            f"output directory '{run_dir}' already holds a run; expected --resume auto to continue it "
            "or a new --output-dir"
        )
    if args.dry_run:
        print(to_yaml(config), end="")
        print(
            f"# dry run ok: dataset {trainer.data.name} train/val/test {len(trainer.data.train)}/"
            f"{len(trainer.data.val)}/{len(trainer.data.test)}, model {config.model.name} "
            f"{trainer.params_initial} params, {len(trainer.morph.sites())} seed sites, device {trainer.device}"
        )
        return 0
    trainer.start()
    if trainer.payload is not None:
        print(f"resuming from {trainer.payload['path']} (epoch {trainer.state.epoch}, step {trainer.state.global_step})",
              flush=True)
    with services:
        services.attach(trainer)
        trainer.train()
        services.finish(trainer)
    print(f"run directory: {run_dir}", flush=True)
    return 0


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists() or bool(ckpt.list_checkpoints(run_dir)) or (run_dir / "metrics.jsonl").exists()


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (status 2), not a bug."""
    from esper.tolaria.checkpoint import CheckpointError
    from esper.tolaria.data import DataError
    from esper.tolaria.hosts import ModelConfigError
    from esper.tolaria.services import ServicesError
    from esper.tolaria.trainer import ResumeError

    return (ServicesError, ConfigError, UsageError, CheckpointError, DataError, ModelConfigError, ResumeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `esper-train` console script."""
    args = build_parser().parse_intermixed_args(argv)
    from esper.tolaria.services import sigterm_as_interrupt

    sigterm_as_interrupt()  # SIGTERM unwinds like Ctrl-C, so child services are stopped
    try:
        return run(args)
    except user_errors() as exc:
        message = " ".join(str(exc).split())
        print(f"esper-train: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("esper-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
