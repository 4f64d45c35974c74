"""Start an Esper server as a child process and learn its address from its first stdout line.

Every Esper server prints ``LISTENING host:port`` as its first stdout line once it is bound and
SERVING (see `esper.serving`). `ServerProcess` starts one (e.g. ``python -m services.urza --port 0
--data-dir D``), waits for that line, and stops it with SIGTERM (then SIGKILL after a timeout).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from esper.serving.server import LISTENING_PREFIX

# Sets the parent-death signal, then execs the command (used when util-linux `setpriv` is missing).
# A separate exec, not a preexec_fn: code run between fork and exec in a multi-threaded parent (a
# training process) can deadlock on a lock another thread held at the fork.
_PDEATHSIG_EXEC = ("import ctypes, os, signal, sys; "
                   "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def die_with_parent_argv(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the kernel sends it SIGTERM when the starting thread dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", *argv]
    return [sys.executable, "-c", _PDEATHSIG_EXEC, *argv]


class ServerStartError(RuntimeError):
    """The child exited or stayed silent instead of printing its LISTENING line."""


def parse_listening_line(line: str) -> str:
    """``'LISTENING 127.0.0.1:5000'`` -> ``'127.0.0.1:5000'``; ValueError for anything else."""
    line = line.strip()
    if not line.startswith(LISTENING_PREFIX):
        raise ValueError(f"expected a first line '{LISTENING_PREFIX}HOST:PORT', got {line!r}")
    address = line[len(LISTENING_PREFIX):].strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT after '{LISTENING_PREFIX.strip()}', got {address!r}")
    return address


class ServerProcess:
    """A server child process. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 start_timeout: float = 60.0, stderr_path: Path | None = None, die_with_parent: bool = False):
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.stderr_path = stderr_path
        self.process: subprocess.Popen[bytes] | None = None
        self.address: str | None = None
        self._stderr_file = None
        # Linux: the kernel sends the child SIGTERM when the thread that started it dies, so a
        # supervisor killed with SIGKILL leaves no orphaned servers behind.
        self.die_with_parent = die_with_parent

    @classmethod
    def python_module(cls, module: str, *args: str, **kwargs) -> ServerProcess:
        """``python -m module args...`` with this interpreter."""
        return cls([sys.executable, "-m", module, *args], **kwargs)

    def start(self) -> str:
        """Launch and wait for the LISTENING line; returns the bound address."""
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.stderr_path is not None:
            self._stderr_file = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        argv = die_with_parent_argv(self.argv) if self.die_with_parent else self.argv
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                        stderr=self._stderr_file if self._stderr_file else None,
                                        env=env, cwd=self.cwd)
        assert self.process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.start_timeout
        buffer = b""
        try:
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerStartError(f"{self.argv} printed no LISTENING line within {self.start_timeout} s")
                if not selector.select(timeout=min(remaining, 0.5)):
                    if self.process.poll() is not None:
                        raise ServerStartError(f"{self.argv} exited with code {self.process.returncode} "
                                               "before printing its LISTENING line")
                    continue
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    self.process.wait(timeout=5)
                    raise ServerStartError(f"{self.argv} exited with code {self.process.returncode} "
                                           "before printing its LISTENING line")
                buffer += chunk
        except BaseException:
            self.stop(timeout=5)
            raise
        finally:
            selector.close()
        self.address = parse_listening_line(buffer.split(b"\n", 1)[0].decode(errors="replace"))
        return self.address

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crash: no graceful shutdown), wait for it; returns the exit code."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        return self.stop()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
