"""`esper-services up` / `check` for real: child servers on loopback, health, clean stop."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.local_stack import SERVICES, module_available
from esper.serving import open_sync_channel
from esper.v1 import oona_pb2, oona_pb2_grpc, urza_pb2, urza_pb2_grpc

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "esper.services_cli"]


def _read_until_ready(proc: subprocess.Popen, timeout: float) -> list[str]:
    lines: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        if not selector.select(timeout=0.5):
            assert proc.poll() is None, f"esper-services up exited early with {proc.returncode}"
            continue
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"esper-services up closed stdout; exit code {proc.wait(5)}"
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            lines.append(line.decode())
            if lines[-1].startswith("READY"):
                return lines
    raise AssertionError(f"no READY line within {timeout} s; got {lines}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_starts_the_stack_check_reports_serving_and_sigterm_stops_everything(tmp_path):
    config = tmp_path / "services.yaml"
    # Urza, Oona, Tezzeret always; Tamiyo too once its server module exists.
    expected = {n for n, spec in SERVICES.items() if not spec.optional or module_available(spec.module)}
    proc = subprocess.Popen([*CLI, "up", "--state-dir", str(tmp_path / "state"), "--write-config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = _read_until_ready(proc, timeout=180)
        rows = {line.split()[0]: line.split() for line in lines[:-1]}
        assert set(rows) == expected
        addresses = {name: row[1] for name, row in rows.items()}
        pids = {name: int(row[3]) for name, row in rows.items()}
        assert all(a.startswith("127.0.0.1:") for a in addresses.values())
        assert all(_pid_alive(pid) for pid in pids.values())

        check = subprocess.run([*CLI, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        for name in expected:
            assert f"{name} " in check.stdout and "SERVING" in check.stdout

        # The servers really work, not just their health service.
        with open_sync_channel(addresses["oona"]) as channel:
            reply = oona_pb2_grpc.OonaServiceStub(channel).Publish(
                oona_pb2.PublishRequest(topic="stack.test", payload=b"hi"), timeout=10)
            assert reply.offset == 0
        with open_sync_channel(addresses["urza"]) as channel:
            listing = urza_pb2_grpc.UrzaServiceStub(channel).ListBlueprints(urza_pb2.ListBlueprintsRequest(),
                                                                             timeout=10)
            assert len(listing.blueprints) >= 8  # the shipped catalog

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stderr = proc.stderr.read().decode()
        assert "SIGTERM received; stopping" in stderr and "non-zero exit codes" not in stderr, stderr
        deadline = time.monotonic() + 10
        while any(_pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_pid_alive(p) for p in pids.values()), "a server outlived esper-services"
        assert {p.name for p in (tmp_path / "state" / "logs").iterdir()} == {f"{n}.log" for n in expected}

        after = subprocess.run([*CLI, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert after.returncode == 1 and after.stdout.count("UNREACHABLE") == len(expected), after.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("args", "code", "words"), [
    (["check"], 2, "nothing to check"),
    (["check", "--address", "nonsense"], 2, "NAME=HOST:PORT"),
    (["check", "--address", "oona=127.0.0.1:notaport"], 2, "expected host:port"),
    (["check", "--config", "/nonexistent/services.yaml"], 2, "cannot read service addresses"),
    (["up", "--only", "urza,bogus"], 2, "subset of"),
    (["up", "--only", "tezzeret"], 2, "needs ['urza']"),
])
def test_bad_input_exits_2_with_a_clear_message(args, code, words):
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert words in result.stderr


def test_check_reports_an_unreachable_service(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"services:\n  oona: 127.0.0.1:{_free_port()}\n")
    result = subprocess.run([*CLI, "check", "--config", str(config), "--timeout", "1"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "oona" in result.stdout and "UNREACHABLE" in result.stdout


def test_check_against_a_live_server_by_address(tmp_path):
    from esper.serving import ServerProcess

    with ServerProcess.python_module("services.oona", "--port", "0", stderr_path=tmp_path / "o.log") as server:
        result = subprocess.run([*CLI, "check", "--address", f"oona={server.address}"], capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr


def test_written_config_is_what_check_reads(tmp_path):
    from esper.local_stack import load_addresses
    from esper.services_cli import _write_config

    path = tmp_path / "s.yaml"
    _write_config(path, {"urza": "127.0.0.1:1234", "oona": "127.0.0.1:2345"})
    assert load_addresses(path) == {"urza": "127.0.0.1:1234", "oona": "127.0.0.1:2345"}
    assert not Path(str(path) + ".tmp").exists()
