"""esper-train's services modes with real processes: --check-services and --services-only in
local mode (started, checked, stopped), remote mode against running servers, and remote mode with
every service down (training completes without adaptation)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from esper.local_stack import LocalStack
from esper.serving import open_sync_channel
from esper.v1 import oona_pb2, oona_pb2_grpc
from tests.system.helpers import DEV, ROOT, process_alive, read_jsonl

pytestmark = pytest.mark.integration


def esper_train(*args: str, timeout: float = 600, mode: str = "local") -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, ESPER_SERVICES_MODE=mode)
    return subprocess.run([sys.executable, "-m", "esper.tolaria.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_services_local_starts_checks_and_stops_them(tmp_path):
    run_dir = tmp_path / "run"
    result = esper_train("--config", DEV, "--output-dir", str(run_dir), "--check-services")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "SERVING" in line]
    assert sorted(line.split()[0] for line in lines) == ["oona", "tamiyo", "tezzeret", "urza"], result.stdout
    pids = json.loads((run_dir / "services" / "pids.json").read_text())["pids"]
    assert set(pids) == {"urza", "oona", "tezzeret", "tamiyo"}
    assert not any(process_alive(pid) for pid in pids.values())
    assert (run_dir / "services" / "logs" / "tamiyo.log").exists()


def test_remote_mode_with_services_down_trains_without_adaptation(tmp_path):
    run_dir = tmp_path / "run"
    down = [f"services.addresses.{name}=127.0.0.1:{closed_port()}" for name in ("urza", "tezzeret", "oona", "tamiyo")]
    check = esper_train("--config", DEV, "--output-dir", str(run_dir), "--check-services", "services.mode=remote",
                        *down)
    assert check.returncode == 1 and check.stdout.count("UNREACHABLE") == 4, check.stdout + check.stderr
    result = esper_train("--config", DEV, "--output-dir", str(run_dir), "--progress", "plain", "train.epochs=40",
                         "logging.tensorboard=false", "services.mode=remote", "services.retry_max_s=1", *down)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training starts anyway" in result.stdout
    assert "training continues without adaptation" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 40 and summary["services"]["outages"]["tamiyo"] >= 1
    assert summary["services"]["germinations"] == [] and summary["adaptations"] == []
    assert read_jsonl(run_dir / "events.jsonl") == []


@pytest.mark.slow
def test_remote_mode_uses_running_services(tmp_path):
    with LocalStack(["urza", "oona", "tezzeret", "tamiyo"], state_dir=tmp_path / "stack") as stack:
        addresses = [f"services.addresses.{n}={a}" for n, a in stack.addresses.items()]
        run_dir = tmp_path / "run"
        check = esper_train("--config", DEV, "--output-dir", str(run_dir), "--check-services",
                            "services.mode=remote", *addresses)
        assert check.returncode == 0 and check.stdout.count("SERVING") == 4, check.stdout + check.stderr
        result = esper_train("--config", DEV, "--output-dir", str(run_dir), "--progress", "plain", "train.epochs=60",
                             "logging.tensorboard=false", "lifecycle.germination_timeout_epochs=200",
                             "services.mode=remote", *addresses)
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["services"]["mode"] == "remote"
        assert summary["services"]["germinations"], summary["services"]
        assert not (run_dir / "services" / "pids.json").exists()  # nothing was started for the run
        assert not stack.exited()  # the remote services outlive the run
        # Every lifecycle transition, the decisions and the epoch metrics were published on Oona.
        with open_sync_channel(stack.addresses["oona"]) as channel:
            topics = {t.name: t.next_offset for t in oona_pb2_grpc.OonaServiceStub(channel).ListTopics(
                oona_pb2.ListTopicsRequest(), timeout=10).topics}
        assert topics["esper.lifecycle"] == len(read_jsonl(run_dir / "events.jsonl"))
        assert topics["esper.metrics"] == 60
        assert topics["esper.decisions"] >= len(summary["adaptations"]) >= 1
        assert topics["esper.kernel.ready"] >= 1


def test_services_only_runs_until_sigterm(tmp_path):
    import os

    run_dir = tmp_path / "run"
    env = dict(os.environ, ESPER_SERVICES_MODE="local")
    proc = subprocess.Popen([sys.executable, "-m", "esper.tolaria.cli", "--config", DEV, "--output-dir",
                             str(run_dir), "--services-only"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("services up:"):
                break
        assert lines and lines[-1].startswith("services up:"), "".join(lines)
        pids = json.loads((run_dir / "services" / "pids.json").read_text())["pids"]
        assert all(process_alive(p) for p in pids.values())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert not any(process_alive(p) for p in pids.values())
    finally:
        if proc.poll() is None:
            proc.kill()
