"""CPU partitioning for a run with local services: the training step gets cores of its own.

On a small machine a compile in Tezzeret, the services and the trainer's own network threads
would otherwise take turns on the cores the training step runs on, and the step waits for them.
`plan_partition` splits the CPUs this process may use into the training CPUs (the training thread
and torch's intra-op threads) and the service CPUs (every local service and its compile workers,
the Tolaria server, the adaptation worker thread, the services watcher).

On Linux an affinity mask belongs to a thread and a new thread or child process inherits the mask
of the thread that creates it; `on_cpus` runs a block with the calling thread moved to other CPUs,
so everything started inside it stays there (`RunServices` starts its children and threads in
one). Elsewhere (no `os.sched_setaffinity`) there is no partition and these are no-ops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


class CpuSpecError(ValueError):
    """A CPU list that cannot be parsed or names CPUs this process may not use."""


def supported() -> bool:
    return hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")


def allowed_cpus() -> list[int]:
    """The CPUs the calling thread may run on (all of `os.cpu_count()` where affinity is unknown)."""
    if supported():
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_cpu_list(text: str) -> list[int]:
    """``"3"``, ``"2-3"``, ``"0,2,4-5"`` -> sorted CPU numbers (the `taskset -c` / cpuset syntax)."""
    cpus: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise CpuSpecError(f"cannot parse CPU list {text!r}: expected numbers and ranges like '3' or '2-3,6'") from None
        if first < 0 or last < first:
            raise CpuSpecError(f"cannot parse CPU list {text!r}: range {part!r} is empty or negative")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise CpuSpecError(f"CPU list {text!r} names no CPU")
    return sorted(cpus)


@dataclass(frozen=True)
class Partition:
    """Which CPUs train and which serve (disjoint, both non-empty)."""

    train: tuple[int, ...]
    services: tuple[int, ...]

    def describe(self) -> str:
        return f"training on CPU {format_cpus(self.train)}, services on CPU {format_cpus(self.services)}"


def format_cpus(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def plan_partition(setting: str, allowed: Sequence[int] | None = None) -> Partition | None:
    """The partition `setting` asks for among `allowed` (default: this thread's CPUs), or None.

    ``off``: none. ``auto``: the last allowed CPU serves (a quarter of them, rounded down, on
    machines with 8 or more) and the rest train; none with fewer than 2 CPUs or without affinity
    support. A CPU list (``"3"``, ``"6-7"``): those CPUs serve, the other allowed ones train.
    """
    setting = str(setting).strip().lower()
    if setting == "off" or not supported():
        return None
    cpus = sorted(allowed if allowed is not None else allowed_cpus())
    if setting == "auto":
        if len(cpus) < 2:
            return None
        n_services = max(1, len(cpus) // 4) if len(cpus) >= 8 else 1
        return Partition(tuple(cpus[:-n_services]), tuple(cpus[-n_services:]))
    services = parse_cpu_list(setting)
    outside = [c for c in services if c not in cpus]
    if outside:
        raise CpuSpecError(f"CPU(s) {format_cpus(outside)} are not available to this process "
                           f"(it may use CPU {format_cpus(cpus)})")
    train = [c for c in cpus if c not in services]
    if not train:
        raise CpuSpecError(f"CPU list {setting!r} leaves no CPU for training (this process may use "
                           f"CPU {format_cpus(cpus)}); name fewer CPUs or use 'off'")
    return Partition(tuple(train), tuple(services))


def pin_current_thread(cpus: Sequence[int]) -> None:
    """Move the calling thread (not the whole process) to `cpus`; a no-op without affinity support."""
    if supported():
        os.sched_setaffinity(0, set(cpus))


@contextmanager
def on_cpus(cpus: Sequence[int] | None) -> Iterator[None]:
    """Run the block with the calling thread on `cpus` (None: unchanged), then restore its mask.

    Threads and child processes started inside the block keep `cpus`.
    """
    if cpus is None or not supported():
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
