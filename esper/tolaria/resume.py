"""Finding the checkpoint a run resumes from, and refusing one of another architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import Config, architecture_of
from esper.tolaria.states import ResumeError


def find_resume_payload(spec: str | None, run_dir: Path) -> dict[str, Any] | None:
    """The payload `--resume spec` names: None (no resume, or `auto` in a run without a
    checkpoint yet), the latest checkpoint of `run_dir` (`auto`) or the one at path `spec`."""
    if spec is None:
        return None
    if spec == "auto":
        latest = ckpt.latest_checkpoint(run_dir)
        return None if latest is None else ckpt.load_checkpoint(latest)
    return ckpt.load_checkpoint(Path(spec))


def check_architecture(payload: dict[str, Any], config: Config) -> None:
    """ResumeError when `config` builds another model than the checkpoint's (naming the key)."""
    stored = payload.get("architecture")
    if not isinstance(stored, dict):
        raise ResumeError(f"checkpoint '{payload.get('path')}' has no architecture record; expected one written by esper-train")
    current = architecture_of(config)
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) != current.get(key):
            raise ResumeError(
                f"--resume: the config changes the architecture at '{key}' "
                f"(checkpoint has {stored.get(key)!r}, config has {current.get(key)!r}); "
                "expected the same model, dataset and seed sites as the checkpoint"
            )
