"""Crash-safe filesystem steps shared by the components that write durable state
(Tolaria checkpoints, Urza blobs, Tamiyo's per-run rails state)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename or create inside it) so it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync the file (not its directory)."""
    with Path(path).open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: an fsynced temporary file, then a rename.

    A reader sees the old content or the new, never a torn file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_file_synced(tmp, data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any, *, indent: int | None = None) -> None:
    """Replace `path` with `value` as JSON atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(value, indent=indent).encode())
