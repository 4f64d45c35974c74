"""The Node.js client (clients/node), run with `node` against real Urza + Oona + Tezzeret servers:
register a blueprint, compile it, wait, download the artifact and verify its SHA-256."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from esper.local_stack import LocalStack
from esper.serving import open_sync_channel
from esper.v1 import urza_pb2, urza_pb2_grpc

pytestmark = pytest.mark.integration
CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
SCRIPT = CLIENT_DIR / "bin" / "esper-compile-fetch.js"
NODE = shutil.which("node")


@pytest.fixture(scope="module")
def node():
    if NODE is None:
        pytest.skip("node is not installed; the Node.js client needs Node.js >= 18")
    assert (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "clients/node/node_modules is missing: run `make build` (npm ci)"
    return NODE


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(["urza", "oona", "tezzeret"], state_dir=tmp_path_factory.mktemp("stack")) as running:
        yield running.addresses


def _run_client(node: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=CLIENT_DIR)


def test_node_client_registers_compiles_waits_and_downloads_a_verified_artifact(node, stack, tmp_path):
    out = tmp_path / "kernel.pt2"
    result = _run_client(node, "--urza", stack["urza"], "--tezzeret", stack["tezzeret"], "--out", str(out),
                         "--input-shape", "-1,16")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["state"] == "COMPILE_JOB_STATE_SUCCEEDED"
    data = out.read_bytes()
    assert len(data) == summary["size_bytes"] > 0
    assert hashlib.sha256(data).hexdigest() == summary["sha256"]
    # The same artifact as Urza describes it to the Python client.
    with open_sync_channel(stack["urza"]) as channel:
        artifact = urza_pb2_grpc.UrzaServiceStub(channel).GetArtifact(
            urza_pb2.GetArtifactRequest(kernel_id=summary["kernel_id"]), timeout=10).artifact
        blueprint = urza_pb2_grpc.UrzaServiceStub(channel).GetBlueprint(
            urza_pb2.GetBlueprintRequest(blueprint_id="node_client_adapter"), timeout=10).blueprint
    assert artifact.sha256 == summary["sha256"] and artifact.size_bytes == len(data)
    assert list(artifact.input_shape.dims) == [-1, 16] and blueprint.family == "adapter"

    # The same request again reuses the stored artifact: identical bytes.
    again_out = tmp_path / "again.pt2"
    again = _run_client(node, "--urza", stack["urza"], "--tezzeret", stack["tezzeret"], "--out", str(again_out))
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["kernel_id"] == summary["kernel_id"] and second["sha256"] == summary["sha256"]
    assert second["blueprint_created"] is False and second["reused"] is True
    assert again_out.read_bytes() == data


def test_node_client_reports_bad_usage_and_unreachable_servers(node, tmp_path):
    usage = _run_client(node, "--urza", "nohostport", "--tezzeret", "127.0.0.1:1", "--out", str(tmp_path / "x"))
    assert usage.returncode == 2 and "--urza must be HOST:PORT" in usage.stderr
    shape = _run_client(node, "--urza", "127.0.0.1:1", "--tezzeret", "127.0.0.1:1", "--out", str(tmp_path / "x"),
                        "--input-shape", "16")
    assert shape.returncode == 2 and "--input-shape" in shape.stderr
    down = _run_client(node, "--urza", "127.0.0.1:1", "--tezzeret", "127.0.0.1:1", "--out", str(tmp_path / "x"),
                       "--timeout", "5")
    assert down.returncode == 1 and "gRPC status 14" in down.stderr  # UNAVAILABLE
    assert not (tmp_path / "x").exists()
