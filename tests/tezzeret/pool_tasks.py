"""Module-level task functions the worker-pool tests send to spawned workers."""

from __future__ import annotations

import os
import signal
import time


def add(a: int, b: int) -> int:
    return a + b


def pid_of_worker() -> int:
    return os.getpid()


def sleep_then_return(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def die_by_sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def slow_init(seconds: float) -> None:
    """Worker initializer that takes a while (like importing torch and warming up)."""
    time.sleep(seconds)
