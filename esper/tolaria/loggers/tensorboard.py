"""TensorBoard event files under `<run_dir>/tensorboard` (scalars as `<scope>/<name>`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardLogger:
    """Mirrors numeric metrics to TensorBoard; on a resume it purges events after the checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass  # config.yaml sits next to the event files

    def log_metrics(self, scope: str, step: int, epoch: int, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"{scope}/{key}", value, step)

    def log_run_end(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        self._writer.close()
