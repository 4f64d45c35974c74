"""Helpers for the system tests: esper-train as a real child process, its run directory, its services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV = str(ROOT / "configs" / "development.yaml")


class TrainProcess:
    """`python -m esper.tolaria.cli ...` with output captured to a file in the run directory's parent."""

    def __init__(self, run_dir: Path, *args: str, mode: str = "local"):
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir.parent / f"{self.run_dir.name}-{int(time.time() * 1000)}.out"
        env = dict(os.environ, ESPER_SERVICES_MODE=mode, PYTHONUNBUFFERED="1")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "esper.tolaria.cli", "--output-dir", str(run_dir),
                                      "--progress", "plain", "--verbose", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"esper-train did not finish within {timeout} s; output:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"esper-train exited ({self.proc.returncode}) while waiting for {what}; "
                                     f"output:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; output:\n{self.output()[-4000:]}")

    def tolaria_address(self, timeout: float = 120.0) -> str:
        path = self.run_dir / "services" / "tolaria.address"
        return self.wait_for(lambda: path.exists() and path.read_text().strip(), timeout, "the Tolaria server")

    def events(self) -> list[dict]:
        return read_jsonl(self.run_dir / "events.jsonl")

    def service_pids(self) -> dict:
        try:
            return json.loads((self.run_dir / "services" / "pids.json").read_text())
        except (OSError, ValueError):
            return {}


def read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
