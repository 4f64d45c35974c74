"""collect -> train -> serve -> esper-train with controller.policy=gnn, end to end on digits."""

from __future__ import annotations

import json
import sys

import pytest

from esper.serving import ServerProcess, open_sync_channel
from esper.tamiyo.collect import collect, plan
from esper.tamiyo.offline import load_replay
from esper.tamiyo.policy_store import load_policy
from esper.tamiyo.train_cli import main as train_main
from esper.tolaria.cli import main as train_run_main
from esper.v1 import tamiyo_pb2, tamiyo_pb2_grpc
from tests.tamiyo.policy_helpers import chain_graph

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_collect_train_serve_and_grow(tmp_path):
    # 1. Collect: two short exploration episodes (the heuristic with epsilon 0, so growth is logged).
    # With their no-growth shadows, for the shadow-return reward.
    totals = collect(plan(["digits-mlp"], [0, 1], ["eps0.0"], ["w16"]), tmp_path / "replay", jobs=1,
                     echo=lambda s: None, shadows=True)
    assert totals["episodes_complete"] == 2 and totals["reports"] == 24 and totals["germinations"] >= 2
    assert totals["shadows_complete"] == 2
    # Resumable: a second call finds both episodes complete and runs nothing.
    assert collect(plan(["digits-mlp"], [0, 1], ["eps0.0"], ["w16"]), tmp_path / "replay", jobs=1,
                   echo=lambda s: None, shadows=True)["episode_wall_s_sum"] == totals["episode_wall_s_sum"]
    # Every report carries the heuristic's decision; the shadows give every episode a return.
    data = load_replay([tmp_path / "replay"], reward="shadow-return")
    assert all(bool(s.has_ref) for s in data.samples) and len(data.samples) == 24
    assert len({round(float(s.reward), 6) for s in data.samples}) <= 2
    # 2. Train.
    assert train_main(["--replay", str(tmp_path / "replay"), "--out", str(tmp_path / "policy"), "--epochs", "40",
                       "--lr", "0.01", "--hidden", "16", "--layers", "2", "--val-fraction", "0.5", "--progress", "none",
                       "--version", "gnn-e2e"]) == 0
    manifest = load_policy(tmp_path / "policy").manifest
    assert manifest["training"]["data"]["tasks"] == ["digits-mlp"] and manifest["training"]["data"]["runs"] == 2
    # 3. Serve it.
    proc = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                          str(tmp_path / "tamiyo"), "--policy", str(tmp_path / "policy")],
                         stderr_path=tmp_path / "tamiyo.log")
    proc.start()
    try:
        with open_sync_channel(proc.address) as channel:
            stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)
            reply = stub.Decide(tamiyo_pb2.DecideRequest(graph=chain_graph()), timeout=60)
            assert reply.policy_version == "gnn-e2e" and reply.decisions[0].reason.startswith("gnn gnn-e2e")
    finally:
        assert proc.stop() == 0
    # 4. esper-train with the learned policy (controller.policy=gnn via --tamiyo-policy) grows and fossilizes.
    # The lifecycle gates are opened (any alignment, any contribution) so that what is tested is the path
    # from a learned decision to a fossilized seed, not how good a policy from two episodes is. The run
    # allows the growth modes the episodes were collected with (the heuristic it clones grew by width there).
    run_dir = tmp_path / "run"
    assert train_run_main(["--config", "configs/development.yaml", "--tamiyo-policy", str(tmp_path / "policy"),
                           "model.width=16", "train.seed=5", "train.epochs=12", "services.mode=off", "train.torch_threads=1",
                           "growth.modes=[branch,width,depth]",
                           "lifecycle.min_alignment=-1.0", "lifecycle.min_contribution=-1.0",
                           "logging.timeline_plot=false", "logging.tensorboard=false", "--output-dir", str(run_dir),
                           "--progress", "none"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    adaptations = summary["adaptations"]
    assert adaptations and all(a["decision"].startswith("gnn gnn-e2e") for a in adaptations)
    assert any(a["outcome"] == "fossilized" for a in adaptations), adaptations
