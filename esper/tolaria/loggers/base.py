"""The logger interface of a run: what every metrics sink (JSONL, TensorBoard, W&B, ...) receives.

A sink implements `RunLogger`; `RunLoggers` fans one call out to all of them. Adding a tracker
(MLflow, say) means one module with one class and one line in `esper.tolaria.loggers.build_loggers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RunLogger(Protocol):
    """One sink of a run's config, metrics and end-of-run record."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config (nested dicts), once at the start of the run."""

    def log_metrics(self, scope: str, step: int, epoch: int, values: Mapping[str, Any]) -> None:
        """Scalars of one `scope` ("step", "epoch", "event") at a global optimizer step."""

    def log_run_end(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        """After training: the summary, and whatever the run left in `run_dir` that the sink keeps
        (events.jsonl, timeline.png, the exported model)."""

    def flush(self) -> None:
        """Makes what was logged so far durable (called once per epoch)."""

    def close(self, failed: bool = False) -> None:
        """Ends the sink; `failed` is True when training raised."""


class RunLoggers:
    """Every sink of a run behind one `RunLogger`; a sink is called in the order given."""

    def __init__(self, loggers: Sequence[RunLogger]) -> None:
        self.loggers = list(loggers)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_metrics(self, scope: str, step: int, epoch: int, values: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_metrics(scope, step, epoch, values)

    def log_run_end(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_run_end(run_dir, summary)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self, failed: bool = False) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.close(failed)
            except Exception as exc:  # one sink failing to close must not leave the others open
                errors.append(exc)
        if errors:
            raise errors[0]
