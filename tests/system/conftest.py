"""Fixtures of the system tests (real esper-train processes with real services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.system.helpers import TrainProcess


@pytest.fixture
def train_process():
    started: list[TrainProcess] = []

    def start(run_dir: Path, *args: str, mode: str = "local") -> TrainProcess:
        p = TrainProcess(run_dir, *args, mode=mode)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
