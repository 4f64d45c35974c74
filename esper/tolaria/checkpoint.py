"""Atomic checkpoints: a temporary directory, a completion marker, then one rename.

Layout of a run directory::

    checkpoints/epoch_0003/state.pt      everything needed for an exact resume
    checkpoints/epoch_0003/COMPLETE      written last; holds the SHA-256 of state.pt
    checkpoints/best.json                which epoch directory holds the best validation loss

A directory without a valid marker (a process killed mid-write leaves `.tmp-*` or a marker-less
directory) is never picked. Pruning keeps the newest `keep_last` epochs plus the best one.
Checkpoints are read with `torch.load(weights_only=True)`: no arbitrary code is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from esper.durable import fsync_dir, write_file_synced, write_json_atomic

FORMAT = "esper.tolaria.checkpoint/1"
MARKER = "COMPLETE"
STATE_FILE = "state.pt"
_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, partial, corrupt or not an Esper checkpoint."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, epoch: int, payload: dict[str, Any], keep_last: int,
                    best_metric: float | None = None) -> Path:
    """Writes `payload` as checkpoint `epoch_{epoch}` atomically; returns its directory.

    `best_metric` (lower is better), when given and better than the recorded best, makes this
    checkpoint the best one. Older epochs beyond `keep_last` are pruned afterwards.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch:04d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    payload = dict(payload, format=FORMAT, epoch=epoch)
    torch.save(payload, tmp / STATE_FILE)
    with (tmp / STATE_FILE).open("rb") as fh:
        os.fsync(fh.fileno())
    marker = {"format": FORMAT, "epoch": epoch, "sha256": _sha256(tmp / STATE_FILE)}
    write_file_synced(tmp / MARKER, json.dumps(marker).encode())
    fsync_dir(tmp)
    if final.exists():
        # Re-writing an epoch (after a resume from an earlier one): retire the old copy first so
        # the rename below is atomic; a crash in between leaves the previous epochs intact.
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(root)
    if best_metric is not None:
        best = read_best(run_dir)
        if best is None or best_metric < best["metric"] or not (root / best["dir"]).is_dir():
            write_json_atomic(root / "best.json", {"dir": final.name, "epoch": epoch, "metric": best_metric})
    prune(run_dir, keep_last)
    return final


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The best-checkpoint record, or None when there is none (or it is unreadable)."""
    path = checkpoint_root(run_dir) / "best.json"
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) and "dir" in value and "metric" in value else None
    except (OSError, ValueError):
        return None


def is_complete(ckpt_dir: Path) -> bool:
    """True when the directory holds a state file whose marker matches its checksum."""
    try:
        marker = json.loads((ckpt_dir / MARKER).read_text())
        return marker.get("format") == FORMAT and marker.get("sha256") == _sha256(ckpt_dir / STATE_FILE)
    except (OSError, ValueError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete epoch checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _EPOCH_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, keep_last: int) -> None:
    """Removes complete epoch checkpoints beyond the newest `keep_last`, never the best one."""
    best = read_best(run_dir)
    protected = {best["dir"]} if best else set()
    found = list_checkpoints(run_dir)
    for path in found[: max(0, len(found) - keep_last)]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
    root = checkpoint_root(run_dir)
    for stale in root.glob(".tmp-*"):
        # Only temporaries of dead writers: ours was renamed already.
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_checkpoint(path: Path) -> Path:
    """Accepts a checkpoint directory, its state.pt, or a run directory (-> its latest checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == STATE_FILE:
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; expected a run directory or a checkpoints/epoch_NNNN directory")
    if path.is_dir() and (path / STATE_FILE).exists():
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint '{path}' is partial or corrupt (missing or mismatching {MARKER} marker); "
                "expected a checkpoint written completely by esper-train"
            )
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"'{path}' holds no complete checkpoint; expected a run directory with checkpoints/epoch_NNNN/{MARKER}")
        return latest
    raise CheckpointError(f"'{path}' is not an Esper checkpoint; expected a run directory or a checkpoints/epoch_NNNN directory")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint (see `resolve_checkpoint` for accepted paths) without unpickling code."""
    ckpt_dir = resolve_checkpoint(path)
    try:
        payload = torch.load(ckpt_dir / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(
            f"checkpoint '{ckpt_dir / STATE_FILE}' cannot be read ({exc.__class__.__name__}); "
            "expected a state file written by esper-train"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{ckpt_dir / STATE_FILE}' is not an Esper training checkpoint; expected format {FORMAT}")
    payload["path"] = str(ckpt_dir)
    return payload
