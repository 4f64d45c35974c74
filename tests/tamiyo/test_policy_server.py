"""esper-tamiyo serving a learned GNN policy as a real server process: decisions, policy info, and a hot
swap to a newer version written into its policy directory, without a restart."""

from __future__ import annotations

import json
import sys
import time

import pytest

from esper.serving import ServerProcess, open_sync_channel
from esper.tamiyo.policy_store import MANIFEST
from esper.v1 import common_pb2, tamiyo_pb2, tamiyo_pb2_grpc
from tests.tamiyo.policy_helpers import always_grow_gnn, chain_graph, untrained_gnn, write_policy

pytestmark = pytest.mark.integration


def start(tmp_path, *extra):
    proc = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                          str(tmp_path / "replay"), *extra], stderr_path=tmp_path / "tamiyo.log")
    proc.start()
    return proc


def wait_for_version(stub, version: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10)
        if info.policy_version == version or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def test_gnn_policy_is_served_and_hot_swapped(tmp_path):
    policy_dir = tmp_path / "policy"
    write_policy(policy_dir, untrained_gnn(seed=0), version="gnn-v1")
    proc = start(tmp_path, "--policy", str(policy_dir), "--policy-poll-s", "0.2")
    try:
        with open_sync_channel(proc.address) as channel:
            stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)
            info = stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10)
            assert (info.policy_kind, info.policy_version, info.policy_swaps) == ("gnn", "gnn-v1", 0)
            assert info.policy_source == str(policy_dir.resolve()) and info.feature_schema == "tamiyo-graph/3"
            reply = stub.Decide(tamiyo_pb2.DecideRequest(graph=chain_graph(run_id="run-a", epoch=2)), timeout=30)
            assert reply.policy_version == "gnn-v1" and reply.decisions[0].reason.startswith("gnn gnn-v1: ")
            # A newer version lands in the directory: the running server picks it up.
            write_policy(policy_dir, always_grow_gnn(), version="gnn-v2")
            info = wait_for_version(stub, "gnn-v2")
            assert (info.policy_version, info.policy_swaps) == ("gnn-v2", 1)
            # The existing run's controller now decides with v2 (which always grows residual_mlp).
            reply = stub.Decide(tamiyo_pb2.DecideRequest(graph=chain_graph(run_id="run-a", epoch=5)), timeout=30)
            (d,) = reply.decisions
            assert reply.policy_version == "gnn-v2" and d.policy_version == "gnn-v2"
            assert d.action == common_pb2.DECISION_ACTION_GERMINATE and d.blueprint_id == "residual_mlp"
            # A policy for another feature schema is refused; v2 keeps serving.
            manifest = json.loads((policy_dir / MANIFEST).read_text())
            manifest.update(version="gnn-v3", feature_schema="tamiyo-graph/0")
            (policy_dir / MANIFEST).write_text(json.dumps(manifest))
            time.sleep(1.5)
            info = stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10)
            assert (info.policy_version, info.policy_swaps) == ("gnn-v2", 1)
            reply = stub.Decide(tamiyo_pb2.DecideRequest(graph=chain_graph(run_id="run-b", epoch=5)), timeout=30)
            assert reply.policy_version == "gnn-v2"
    finally:
        assert proc.stop() == 0
    log = (tmp_path / "tamiyo.log").read_text()
    assert "policy swapped: gnn-v1 -> gnn-v2" in log and "feature schema 'tamiyo-graph/0'" in log


def test_a_policy_that_cannot_load_stops_the_server_at_start(tmp_path):
    (tmp_path / "nothing").mkdir()
    proc = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                          str(tmp_path / "r"), "--policy", str(tmp_path / "nothing")], stderr_path=tmp_path / "log")
    with pytest.raises(Exception, match="exited with code 2"):
        proc.start()
    assert "no manifest.json" in (tmp_path / "log").read_text()
