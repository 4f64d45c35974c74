"""Metric sinks of a run: a JSONL file (one record per line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends metric records to `metrics.jsonl` and mirrors scalars to TensorBoard.

    On a resume the JSONL file is cut back to the checkpoint's step (records a killed process
    wrote after its last checkpoint would otherwise appear twice) and TensorBoard purges them too.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a killed writer
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is a declared dependency; degrade rather than crash
                self._tb = None

    def write(self, scope: str, step: int, epoch: int, values: dict[str, Any]) -> None:
        """Records `values` (scalars) for `scope` ("step", "epoch", ...) at a global step."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._fh.write(json.dumps({"scope": scope, "step": step, "epoch": epoch, **clean}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{scope}/{key}", value, step)

    def flush(self) -> None:
        self._fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, scope: str | None = None) -> list[dict[str, Any]]:
    """Reads the records of a run's metrics.jsonl, optionally one scope only."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if scope is None or record.get("scope") == scope:
            out.append(record)
    return out
