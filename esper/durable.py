"""Crash-safe filesystem steps shared by the components that write durable state
(Tolaria checkpoints, Urza blobs)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename or create inside it) so it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
