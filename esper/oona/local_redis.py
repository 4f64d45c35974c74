"""Start a throwaway `redis-server` on a free loopback port (tests, benchmarks, local stacks).

It runs in its own temporary directory with persistence off and is stopped with SIGTERM
(SIGKILL after a timeout). Nothing but 127.0.0.1 is ever bound or contacted.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class RedisServerUnavailable(RuntimeError):
    """No redis-server binary, or it would not start."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedisServer:
    """``with LocalRedisServer() as r: r.url`` -> ``redis://127.0.0.1:PORT/0``."""

    def __init__(self, binary: str | None = None, start_timeout: float = 15.0):
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisServerUnavailable("redis-server is not installed; `make build` installs it "
                                         "(apt package redis-server)")
        self.binary = found
        self.start_timeout = start_timeout
        self.port: int | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis-server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Launch on a free port (retrying if another process grabs it first); returns the URL."""
        self._dir = tempfile.TemporaryDirectory(prefix="esper-redis-")
        last_error = ""
        for _ in range(5):
            port = _free_port()
            log_path = Path(self._dir.name) / "redis.log"
            self._process = subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self._dir.name,
                 "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--logfile", str(log_path),
                 "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self._process.poll() is None:
                if _ping(port, 0.5):
                    self.port = port
                    return self.url
                time.sleep(0.05)
            last_error = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            self._kill()
        self.stop()
        raise RedisServerUnavailable(f"redis-server did not start on a loopback port; last log:\n{last_error}")

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        self._kill()
        self.port = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LocalRedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
