"""StepSlices: background Python work runs only in the slices the training thread grants."""

from __future__ import annotations

import threading
import time

import pytest

from esper.tolaria.slices import StepSlices


def busy_work(stamps: list[float], n: int) -> int:
    def tick() -> float:
        return time.perf_counter()

    for _ in range(n):
        stamps.append(tick())  # a Python call per iteration: the slicer checks the clock on calls
    return n


def test_work_runs_only_inside_granted_slices():
    slices = StepSlices(share=0.25)
    stamps: list[float] = []
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(slices.run(busy_work, stamps, 400_000)))
    worker.start()
    while not slices.busy:
        time.sleep(0.001)
    time.sleep(0.02)
    assert stamps == []  # nothing runs before the first slice
    windows = []
    deadline = time.monotonic() + 60
    while worker.is_alive() and time.monotonic() < deadline:
        start = time.perf_counter()
        slices.grant(0.004)  # a 1 ms slice
        windows.append((start, time.perf_counter()))
        time.sleep(0.01)  # "a training step": the work must not run now
    worker.join(timeout=5)
    assert result == [400_000], "the work did not finish in its slices"
    assert slices.slices == len(windows) > 3
    ends = [end for _, end in windows]
    outside = 0
    i = 0
    for t in stamps:
        while i < len(windows) and t > ends[i] + 0.0005:
            i += 1
        if i == len(windows) or t < windows[i][0]:
            outside += 1
    # A wake-up that comes late on a busy machine may let a few calls run past their slice.
    assert outside / len(stamps) < 0.2, f"{outside} of {len(stamps)} calls ran outside the slices"


def test_release_lets_work_finish_without_slices():
    slices = StepSlices()
    stamps: list[float] = []
    worker = threading.Thread(target=slices.run, args=(busy_work, stamps, 10_000))
    worker.start()
    while not slices.busy:
        time.sleep(0.001)
    slices.release()
    worker.join(timeout=30)
    assert not worker.is_alive() and len(stamps) == 10_000
    assert slices.grant(1.0) == 0.0  # released: grants are no-ops


def test_grant_without_work_returns_at_once_and_errors_propagate():
    slices = StepSlices()
    started = time.perf_counter()
    assert slices.grant(5.0) == 0.0 and time.perf_counter() - started < 0.5
    errors: list[BaseException] = []

    def run() -> None:
        try:
            slices.run(lambda: 1 / 0)
        except ZeroDivisionError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while not slices.busy and worker.is_alive():
        time.sleep(0.001)
    while worker.is_alive():
        slices.grant(0.004)
    worker.join()
    assert len(errors) == 1 and not slices.busy
    with pytest.raises(ValueError, match="share"):
        StepSlices(share=0)
