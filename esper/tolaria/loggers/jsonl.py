"""The run's `metrics.jsonl`: one JSON record per line, the sink every run has."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FILE_NAME = "metrics.jsonl"


class JsonlLogger:
    """Appends metric records to `metrics.jsonl`.

    On a resume the file is cut back to the checkpoint's step (records a killed process wrote after
    its last checkpoint would otherwise appear twice); a fresh run starts an empty file.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / FILE_NAME
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

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass  # config.yaml in the run directory already holds it

    def log_metrics(self, scope: str, step: int, epoch: int, values: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self._fh.write(json.dumps({"scope": scope, "step": step, "epoch": epoch, **clean}) + "\n")

    def log_run_end(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        pass  # summary.json is written by the trainer

    def flush(self) -> None:
        self._fh.flush()

    def close(self, failed: bool = False) -> None:
        self._fh.close()


def read_metrics(run_dir: Path, scope: str | None = None) -> list[dict[str, Any]]:
    """Reads the records of a run's metrics.jsonl, optionally one scope only."""
    path = Path(run_dir) / FILE_NAME
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if scope is None or record.get("scope") == scope:
            out.append(record)
    return out
