"""Starting and ending a torchrun job of esper-train: launching the ranks on this machine,
knowing that this process is one of them, and the one-line message a rank stops with when a
peer is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import torch.distributed as dist

from esper.tolaria.replicas import DistributedError


def launched_by_torchrun() -> bool:
    """True inside a process that torchrun (or any launcher setting WORLD_SIZE > 1) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Runs `esper-train argv` as `nproc` ranks under torchrun on this machine; returns its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--max-restarts", "0", "-m", "esper.tolaria.cli", *argv]
    env = dict(os.environ)
    # torchrun would otherwise warn and default to 1; RankGroup.start sets the real value per rank.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:  # torchrun got the same SIGINT and stops the ranks itself
        return 130


def describe_rank_failure(exc: BaseException) -> str | None:
    """The one-line message of a rank that stops because the job cannot go on, else None.

    A dead peer surfaces in the survivors as an error of whichever collective they were in
    (gloo: connection closed or reset; any backend: the collective timeout).
    """
    if not launched_by_torchrun():
        return None
    where = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, DistributedError):
        return f"{where}: {first}"
    if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
            word in str(exc) for word in ("Connection closed", "Connection reset", "Timed out", "timed out",
                                          "Broken pipe", "gloo", "NCCL"))):
        return (f"{where}: a collective failed: another rank stopped or cannot be reached "
                f"({type(exc).__name__}: {first}); the job stops. Continue from the last checkpoint "
                "with --resume auto")
    return None
