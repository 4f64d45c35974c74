"""`esper-train`: train a host model while Esper grows seeds in it.

    esper-train --config configs/development.yaml optim.lr=0.01 model.width=64 --output-dir runs/dev
    esper-train --output-dir runs/dev --resume auto
    esper-train --config configs/mnist1d.yaml --no-morphogenetic      # the static baseline
    esper-train --nproc 2 --config configs/development.yaml           # 2 data-parallel ranks (torchrun)
    esper-train --quick-start mnist1d --epochs 5 --wandb --profile    # shipped config, W&B, profiler

Under torchrun (`--nproc N`, or `torchrun --nproc-per-node N -m esper.tolaria.cli ...`) data.batch_size
is the global batch; rank 0 writes the run directory and talks to the services (see
esper.tolaria.distributed).

Bad input (config, data, checkpoint, an architecture-changing resume) exits with status 2 and a
one-line message on stderr, before anything in the run directory is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import (
    Config,
    ConfigError,
    DatasetName,
    ModelName,
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


# --quick-start NAME -> the shipped config it runs (configs/ next to the package).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PRESETS = {"digits": "development.yaml", "mnist1d": "mnist1d.yaml", "cifar10": "cifar10.yaml",
           "cifar100": "cifar100.yaml"}
# Shorthand flag (argparse dest) -> the dotted key it sets.
SHORTHANDS = {"model": "model.name", "dataset": "data.name", "epochs": "train.epochs",
              "batch_size": "data.batch_size", "learning_rate": "optim.lr", "data_dir": "data.data_dir",
              "device": "train.device", "profile": "logging.profile_steps",
              "metrics_port": "logging.prometheus_port"}
DEFAULT_PROFILE_STEPS = 20


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="esper-train", description="Morphogenetic training: grow seeds in a host model while it trains.",
                epilog="Precedence: defaults < --config file (or --quick-start) < flags < KEY=VALUE overrides.")
    conf = p.add_argument_group("configuration")
    conf.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="dotted config overrides, e.g. optim.lr=0.01 (they win over every flag)")
    conf.add_argument("--config", help="YAML config file")
    conf.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    quick = p.add_argument_group("quick setup (shorthands for the dotted keys in brackets)")
    quick.add_argument("--quick-start", choices=sorted(PRESETS),
                       help="run a shipped config: " + ", ".join(f"{k} = configs/{v}" for k, v in PRESETS.items()))
    quick.add_argument("--model", choices=typing.get_args(ModelName), help="[model.name] host model")
    quick.add_argument("--dataset", choices=typing.get_args(DatasetName), help="[data.name] dataset")
    quick.add_argument("--epochs", type=int, help="[train.epochs]")
    quick.add_argument("--batch-size", type=int, help="[data.batch_size]")
    quick.add_argument("--learning-rate", "--lr", type=float, help="[optim.lr]")
    quick.add_argument("--data-dir", help="[data.data_dir] dataset directory (CIFAR batches, MNIST-1D cache)")
    quick.add_argument("--device", choices=["auto", "cpu", "cuda"], help="[train.device]")
    morph = p.add_argument_group("morphogenetic")
    morph.add_argument("--tamiyo-policy", metavar="PATH",
                       help="[controller.policy=gnn, controller.policy_path] let the learned Tamiyo policy in PATH "
                            "decide")
    morph.add_argument("--no-morphogenetic", action="store_true",
                       help="same run, seeds never germinate (the static baseline)")
    control = p.add_argument_group("training control")
    control.add_argument("--output-dir", help="run directory (default runs/<run_name>)")
    control.add_argument("--resume", metavar="auto|PATH", help="auto: latest complete checkpoint of --output-dir if "
                         "any; PATH: a run directory or checkpoints/epoch_NNNN")
    control.add_argument("--dry-run", action="store_true",
                         help="validate config, data and environment, print the config, exit")
    control.add_argument("--nproc", type=int, metavar="N", help="run N data-parallel ranks on this machine "
                         "(launches torchrun; data.batch_size stays the global batch)")
    control.add_argument("--collective-timeout", type=float, default=30.0, metavar="S",
                         help="under torchrun: seconds a collective may wait for the other ranks before the job stops")
    control.add_argument("--mixed-precision", choices=["bf16", "fp16"],
                         help="[train.amp, train.amp_dtype] CUDA only: autocast in bfloat16, or float16 with a "
                              "grad scaler")
    logs = p.add_argument_group("logging")
    logs.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto",
                      help="rich bars on a terminal (auto), one plain line per epoch, or nothing")
    logs.add_argument("--verbose", action="store_true", help="print every lifecycle event")
    logs.add_argument("--wandb", action="store_true",
                      help="[logging.wandb=true] log to Weights & Biases (offline without credentials; "
                           "`wandb sync` uploads later)")
    logs.add_argument("--profile", type=int, nargs="?", const=DEFAULT_PROFILE_STEPS, metavar="STEPS",
                      help=f"[logging.profile_steps] torch.profiler over STEPS steps (default {DEFAULT_PROFILE_STEPS}) "
                           "after warm-up: trace in RUN_DIR/profile/, top operators printed")
    logs.add_argument("--metrics-port", type=int, metavar="PORT",
                      help="[logging.prometheus_port] serve Prometheus /metrics of the trainer (0: any free port)")
    services = p.add_argument_group("services")
    services.add_argument("--check-services", action="store_true",
                          help="report the health of the run's services (services.mode local: start them, check, stop)")
    services.add_argument("--services-only", action="store_true",
                          help="start the run's services (services.mode local), print their addresses, wait for Ctrl-C")
    return p


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides the flags stand for, in a fixed order (applied before KEY=VALUE ones)."""
    # JSON is YAML: a path with ': ' or a leading '[' stays a string when the override is parsed.
    out = [f"{key}={json.dumps(getattr(args, dest))}" for dest, key in SHORTHANDS.items()
           if getattr(args, dest, None) is not None]
    if args.wandb:
        out.append("logging.wandb=true")
    if getattr(args, "tamiyo_policy", None):
        out += ["controller.policy=gnn", f"controller.policy_path={json.dumps(str(Path(args.tamiyo_policy).resolve()))}"]
    if getattr(args, "mixed_precision", None):
        out += ["train.amp=true", f"train.amp_dtype={'bfloat16' if args.mixed_precision == 'bf16' else 'float16'}"]
    return out


def config_file(args: argparse.Namespace) -> str | None:
    """--config, or the shipped config --quick-start names (not both)."""
    if args.quick_start is None:
        return args.config
    if args.config is not None:
        raise UsageError(f"--quick-start {args.quick_start} and --config {args.config} both name a config file; "
                         "expected one of them")
    return str(CONFIG_DIR / PRESETS[args.quick_start])


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < --config file (or --quick-start, or the resumed checkpoint's config) < flags < overrides."""
    overrides = flag_overrides(args) + list(args.overrides)
    path = config_file(args)
    if path is None and args.resume is not None:
        checkpoint = _resume_path(args)
        if checkpoint is not None:
            base = from_dict(ckpt.load_checkpoint(checkpoint)["config"])
            for text in overrides:
                key, value = parse_override(text)
                apply_override(base, key, value)
            validate(base)
            return base
    return load_config(path, overrides)


def _resume_path(args: argparse.Namespace) -> Path | None:
    if args.resume == "auto":
        if args.output_dir is None:
            raise UsageError("--resume auto needs --output-dir (the run directory to continue)")
        return ckpt.latest_checkpoint(Path(args.output_dir))
    return ckpt.resolve_checkpoint(Path(args.resume))


def _check_mixed_precision(args: argparse.Namespace, config: Config) -> None:
    if not args.mixed_precision:
        return
    import torch

    device = config.train.device
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        raise UsageError(
            f"--mixed-precision {args.mixed_precision} needs a CUDA device, but this run trains on the CPU "
            f"(train.device={device}{', no CUDA device present' if device == 'auto' else ''}); "
            "expected --device cuda on a machine with a GPU, or no --mixed-precision"
        )


def run(args: argparse.Namespace) -> int:
    from esper.tolaria.trainer import Trainer

    config = resolve_config(args)
    _check_mixed_precision(args, config)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    if config.logging.wandb:
        from esper.tolaria.loggers.wandb_logger import import_wandb

        import_wandb()  # a missing library is bad input: say so before any work
    run_dir = Path(args.output_dir) if args.output_dir else Path("runs") / config.run_name
    if args.check_services or args.services_only:
        from esper.tolaria.services import services_command

        return services_command(config, run_dir, check=args.check_services)
    if args.nproc is not None:
        return _launch(args, config)
    from esper.tolaria.distributed import RankGroup

    ranks = RankGroup.start(config.train.device, args.collective_timeout, config.train.torch_threads)
    code = _run_rank(args, config, run_dir, ranks, Trainer)
    ranks.close()  # not after a failure: tearing down a group with a dead peer can hang or abort
    return code


def _launch(args: argparse.Namespace, config: Config) -> int:
    from esper.tolaria.torchrun import launch, launched_by_torchrun

    if launched_by_torchrun():
        raise UsageError("--nproc inside a torchrun job; expected either --nproc N or torchrun, not both")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if config.data.batch_size % args.nproc:
        raise ConfigError(
            f"data.batch_size: the global batch {config.data.batch_size} does not split over {args.nproc} ranks; "
            f"expected a multiple of {args.nproc}"
        )
    argv = _without_nproc(sys.argv[1:] if args.argv is None else args.argv)
    code = launch(args.nproc, argv)
    if code != 0:
        print(f"esper-train: error: the {args.nproc}-rank job failed (exit status {code}); the failing rank's "
              "message is above. Continue from the last checkpoint with --resume auto", file=sys.stderr)
    return code


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


class _NoServices:
    """Ranks other than 0 never talk to the services (rank 0 does, and broadcasts what matters)."""

    server_metrics = None

    def partition_cpus(self) -> None:
        pass

    def controller_factory(self, morphogenetic: bool) -> None:
        return None

    def hooks(self) -> list:
        return []

    def attach(self, trainer) -> None:
        pass

    def finish(self, trainer) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def _run_rank(args: argparse.Namespace, config: Config, run_dir: Path, ranks, trainer_cls) -> int:
    from esper.tolaria.monitors import Monitors
    from esper.tolaria.services import RunServices

    services: Any = _NoServices()
    monitors = Monitors(config.logging if ranks.is_writer else None, run_dir, lambda: services)
    if ranks.is_writer:
        services = RunServices(config, run_dir, server_metrics=monitors.server_metrics)
    services.partition_cpus()
    morphogenetic = not args.no_morphogenetic
    trainer = trainer_cls(config, run_dir, morphogenetic=morphogenetic, verbose=args.verbose,
                          progress=args.progress if ranks.is_writer else "none", resume=args.resume, ranks=ranks,
                          controller=services.controller_factory(morphogenetic and config.morphogenetic),
                          hooks=[*monitors.hooks, *services.hooks()])
    trainer.prepare()  # validates config, data, model and checkpoint; writes nothing
    if args.resume is None and not args.dry_run and _holds_run(run_dir):
        raise UsageError(
            f"output directory '{run_dir}' already holds a run; expected --resume auto to continue it "
            "or a new --output-dir"
        )
    ranks.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    # Rank 0 starts the services before the first step: the others wait that long, not a collective's timeout.
    start_up_s = max(args.collective_timeout, 4 * config.services.start_timeout_s + 30)
    if not ranks.is_writer:
        if not args.dry_run:
            trainer.start()
            ranks.wait(start_up_s, "rank 0 to start the run's services")
            trainer.train()
        return 0
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
    closers = monitors.start()
    try:
        with services:
            services.attach(trainer)
            ranks.wait(start_up_s, "rank 0 to start the run's services")
            trainer.train()
            services.finish(trainer)
    finally:
        for close in closers:
            close()
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
    from esper.tolaria.states import ResumeError

    return (ServicesError, ConfigError, UsageError, CheckpointError, DataError, ModelConfigError, ResumeError)


def _profile_default(argv: list[str]) -> list[str]:
    """`--profile` followed by a KEY=VALUE or a flag means the default step count (argparse would
    otherwise try to read the next word as STEPS)."""
    out = []
    for i, word in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if word == "--profile" and (following is None or not following.isdigit()):
            word = f"--profile={DEFAULT_PROFILE_STEPS}"
        out.append(word)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `esper-train` console script."""
    args = build_parser().parse_intermixed_args(_profile_default(list(sys.argv[1:] if argv is None else argv)))
    args.argv = None if argv is None else list(argv)
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
    except Exception as exc:
        from esper.tolaria.torchrun import describe_rank_failure

        message = describe_rank_failure(exc)
        if message is None:
            raise
        print(f"esper-train: error: {message}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
