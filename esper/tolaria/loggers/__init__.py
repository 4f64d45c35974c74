"""Metric sinks of a training run behind one interface (`RunLogger`).

- `JsonlLogger`: `metrics.jsonl` in the run directory (always on);
- `TensorBoardLogger`: `tensorboard/` event files (`logging.tensorboard`);
- `WandbLogger`: Weights & Biases, online or offline (`logging.wandb`, `--wandb`).

`build_loggers(config, run_dir, resume_step)` returns the run's `RunLoggers`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from esper.tolaria.config import Config
from esper.tolaria.loggers.base import RunLogger, RunLoggers
from esper.tolaria.loggers.jsonl import JsonlLogger, read_metrics


def build_loggers(config: Config, run_dir: Path, resume_step: int | None,
                  echo: Callable[[str], None] = print) -> RunLoggers:
    """The sinks `config.logging` asks for; `resume_step` is the checkpoint step of a resume."""
    loggers: list[RunLogger] = [JsonlLogger(run_dir, resume_step)]
    settings = config.logging
    if settings.tensorboard:
        try:
            from esper.tolaria.loggers.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir, resume_step))
        except ImportError as exc:  # a declared dependency: say so, keep training
            echo(f"TensorBoard logging off: {exc}")
    if settings.wandb:
        from esper.tolaria.loggers.wandb_logger import WandbLogger

        loggers.append(WandbLogger(run_dir, settings, config.run_name, resuming=resume_step is not None, echo=echo))
    return RunLoggers(loggers)


__all__ = ["JsonlLogger", "RunLogger", "RunLoggers", "build_loggers", "read_metrics"]
